//! Method names on the wire, in one place.
//!
//! ```
//! assert_eq!(crp_core::methods::USE, "crp/use");
//! assert!("x-crp/whoami".starts_with(crp_core::methods::EXTENSION_PREFIX));
//! ```

/// v0.2: obtain a use-handle (lease + proxy URL). REQUIRED.
pub const USE: &str = "crp/use";
/// v0.1 only: obtain credential material. Gated by policy and audited as an export.
pub const RESOLVE: &str = "crp/resolve";
/// Renew or release a lease.
pub const LEASE: &str = "crp/lease";
/// Revoke a lease and every delegated descendant.
pub const REVOKE: &str = "crp/revoke";
/// Discover services.
pub const LIST: &str = "crp/list";
/// Prefix of this implementation's extension methods (spec §12 of v0.1 reserves `x-crp/`).
pub const EXTENSION_PREFIX: &str = "x-crp/";
