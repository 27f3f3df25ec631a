//! Credential material in memory.
//!
//! [`SecretValue`] owns secret bytes in a zeroizing buffer. It implements neither `Display`
//! nor a revealing `Debug`, so it cannot end up in an error message, a log line or a panic by
//! accident. It does implement `Serialize`, because the only place it appears on the wire is
//! the explicit, policy-gated v0.1 export (`crp/resolve`); every other message type simply has
//! no field of this type.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// A secret string, wiped from memory on drop.
///
/// ```
/// use crp_core::SecretValue;
/// let s = SecretValue::new("sk-live-123");
/// assert_eq!(format!("{s:?}"), "SecretValue([REDACTED])");
/// assert_eq!(s.expose(), "sk-live-123");
/// assert_eq!(s.len(), 11);
/// // It serializes as the plain string, for the one explicit export path.
/// assert_eq!(serde_json::to_string(&s).unwrap(), r#""sk-live-123""#);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wrap a value. The caller's copy should be dropped (or zeroized) promptly.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself. Every call site is a place where material leaves its wrapper:
    /// keep them few and grep-able.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// Length in bytes (safe to log).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([REDACTED])")
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretValue::new)
    }
}

impl JsonSchema for SecretValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretValue".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Credential material. Only ever present in a v0.1 export (crp/resolve)."
        })
    }
    fn inline_schema() -> bool {
        true
    }
}
