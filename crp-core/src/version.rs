//! Version negotiation (v0.1 §5.1, v0.2 §4): `MAJOR.MINOR`; majors must match; on a minor
//! mismatch the lower minor wins; no common version is -33001 with the supported list.

use std::fmt;

use crate::error::CrpError;

/// A protocol version this implementation speaks. Ordered oldest first.
///
/// ```
/// use crp_core::Version;
/// assert!(Version::V0_1 < Version::LATEST);
/// assert_eq!(Version::V0_2.to_string(), "0.2");
/// assert_eq!(crp_core::version::SUPPORTED, ["0.2", "0.1"]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// v0.1: `crp/resolve` returns material.
    V0_1,
    /// v0.2: `crp/use` returns a handle.
    V0_2,
}

/// Supported versions, newest first.
pub const SUPPORTED: [&str; 2] = ["0.2", "0.1"];

impl Version {
    /// The newest version.
    pub const LATEST: Version = Version::V0_2;

    /// `MAJOR.MINOR`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_1 => "0.1",
            Self::V0_2 => "0.2",
        }
    }

    fn minor(self) -> u64 {
        match self {
            Self::V0_1 => 1,
            Self::V0_2 => 2,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `(major, minor)` of a `MAJOR.MINOR` string, also accepting a `MAJOR.MINOR.PATCH` such as
/// the spec's own `0.2.0` (the patch is ignored); surrounding whitespace is ignored. Numbers
/// too large for `u64` saturate, which keeps the comparison right: such a major is never 0
/// and such a minor is above every minor we speak.
fn parse(v: &str) -> Option<(u64, u64)> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().unwrap_or(u64::MAX))
    };
    let mut parts = v.trim().split('.');
    let major = number(parts.next()?)?;
    let minor = number(parts.next()?)?;
    match (parts.next(), parts.next()) {
        (None, _) => Some((major, minor)),
        (Some(patch), None) => number(patch).map(|_| (major, minor)),
        (Some(_), Some(_)) => None,
    }
}

/// Pick the version to speak with a caller who asked for `requested` (`None`: the newest).
///
/// Rules (v0.1 §5.2, v0.2 §4): the majors must match; when the minors differ the lower one
/// wins, so a caller asking for `0.9` speaks `0.2` and one asking for `0.1` speaks `0.1`.
/// A patch component (`0.2.0`) is ignored. Anything else, including a string that is not
/// `MAJOR.MINOR`, is -33001 with `data.supported`. This function never panics.
///
/// ```
/// use crp_core::version::{negotiate, Version};
/// assert_eq!(negotiate(None).unwrap(), Version::V0_2);
/// assert_eq!(negotiate(Some("0.1")).unwrap(), Version::V0_1);
/// assert_eq!(negotiate(Some("0.2.0")).unwrap(), Version::V0_2);
/// let e = negotiate(Some("2.0")).unwrap_err();
/// assert_eq!(e.data.unwrap().supported.unwrap(), vec!["0.2", "0.1"]);
/// ```
pub fn negotiate(requested: Option<&str>) -> Result<Version, CrpError> {
    let Some(requested) = requested else {
        return Ok(Version::LATEST);
    };
    let mismatch = || CrpError::version_mismatch(requested, &SUPPORTED);
    let (major, minor) = parse(requested).ok_or_else(mismatch)?;
    if major != 0 {
        return Err(mismatch());
    }
    // Lower minor wins: the highest version we speak whose minor is <= the caller's.
    [Version::V0_2, Version::V0_1]
        .into_iter()
        .find(|v| v.minor() <= minor)
        .ok_or_else(mismatch)
}
