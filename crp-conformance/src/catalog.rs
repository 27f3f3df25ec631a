//! The case catalog's vocabulary: tiers, requirement levels, case metadata and verdicts.
//!
//! A case is data plus one async check. Its id is stable (reports, `--only` and CI history key
//! on it); its tier is the v0.2 §8 tier (v0.1 cases use v0.1 §13.3's levels), its section the
//! spec section it tests, its level the RFC 2119 keyword of the requirement.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

use crate::ctx::Ctx;

/// Conformance tier (v0.2 §8; v0.1 §13.3 for v0.1 cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// `crp/use`, lease lifecycle, audit by default.
    Basic,
    /// + list, revoke, version negotiation, classification.
    Standard,
    /// + delegation, brokering, graduated outcomes, policy enforcement.
    Full,
}

impl Tier {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Basic => "basic",
            Self::Standard => "standard",
            Self::Full => "full",
        }
    }

    /// Parse a wire name.
    pub fn parse(s: &str) -> Option<Tier> {
        match s.trim().to_ascii_lowercase().as_str() {
            "basic" => Some(Self::Basic),
            "standard" => Some(Self::Standard),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
}

/// RFC 2119 requirement level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Level {
    /// MUST / MUST NOT / REQUIRED: a failure fails the run.
    #[serde(rename = "MUST")]
    Must,
    /// SHOULD / RECOMMENDED: reported, does not fail the run.
    #[serde(rename = "SHOULD")]
    Should,
    /// MAY: informative.
    #[serde(rename = "MAY")]
    May,
}

impl Level {
    /// The keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Must => "MUST",
            Self::Should => "SHOULD",
            Self::May => "MAY",
        }
    }
}

/// What a case is.
#[derive(Debug, Clone, Serialize)]
pub struct CaseMeta {
    /// Stable id, e.g. `use.no-secret-in-result`.
    pub id: &'static str,
    /// Tier that requires it.
    pub tier: Tier,
    /// Spec version, `0.1` or `0.2`.
    pub spec: &'static str,
    /// Section, e.g. `§5.1`.
    pub section: &'static str,
    /// Requirement level.
    pub level: Level,
    /// One line.
    pub description: &'static str,
    /// Takes seconds (waits for an expiry): started early, run alongside the others.
    #[serde(skip)]
    pub slow: bool,
    /// Runs after every other case (reads the whole transcript).
    #[serde(skip)]
    pub last: bool,
}

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The provider broke the rule.
    Fail(String),
    /// The case does not apply (feature absent, transport cannot express it, ...).
    Skip(String),
    /// The runner could not complete the case (transport failure, timeout).
    Error(String),
}

/// A case's result.
pub type CaseResult = Result<(), Stop>;

/// The boxed check.
pub type CaseFuture = Pin<Box<dyn Future<Output = CaseResult> + Send + 'static>>;

/// A case: metadata and check.
#[derive(Clone)]
pub struct Case {
    /// Metadata.
    pub meta: CaseMeta,
    /// The check.
    pub run: fn(Ctx) -> CaseFuture,
}

impl Case {
    /// A case.
    pub fn new(
        id: &'static str,
        tier: Tier,
        spec: &'static str,
        section: &'static str,
        level: Level,
        description: &'static str,
        run: fn(Ctx) -> CaseFuture,
    ) -> Case {
        Case { meta: CaseMeta { id, tier, spec, section, level, description, slow: false, last: false }, run }
    }

    /// Mark as slow (waits for an expiry).
    pub fn slow(mut self) -> Case {
        self.meta.slow = true;
        self
    }

    /// Mark as running after every other case.
    pub fn last(mut self) -> Case {
        self.meta.last = true;
        self
    }
}

/// Fail the case with a formatted reason.
#[macro_export]
macro_rules! fail {
    ($($t:tt)*) => { return Err($crate::catalog::Stop::Fail(format!($($t)*))) };
}

/// Skip the case with a formatted reason.
#[macro_export]
macro_rules! skip {
    ($($t:tt)*) => { return Err($crate::catalog::Stop::Skip(format!($($t)*))) };
}

/// Fail unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {{ let ok: bool = $cond; if !ok { $crate::fail!($($t)*); } }};
}
