//! The JSON Schemas of `schemas/` (generated from crp-core's types, committed), embedded so
//! the runner validates answers without reading files at run time.
//!
//! Validation errors are reported with the instance masked (`ValidationError::masked`), so a
//! schema failure never prints a value the provider sent.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

macro_rules! embed {
    ($($stem:literal),* $(,)?) => {
        &[$(($stem, include_str!(concat!("../../schemas/", $stem, ".schema.json")))),*]
    };
}

/// `(stem, text)` of every embedded schema.
pub const SCHEMAS: &[(&str, &str)] = embed!(
    "capability",
    "use-result",
    "resolve-result",
    "lease-result",
    "revoke-result",
    "list-result",
    "error",
    "jsonrpc-response",
    "x-audit-query-result",
);

fn validators() -> &'static HashMap<&'static str, Result<jsonschema::Validator, String>> {
    static V: OnceLock<HashMap<&'static str, Result<jsonschema::Validator, String>>> = OnceLock::new();
    V.get_or_init(|| {
        SCHEMAS
            .iter()
            .map(|(stem, text)| {
                let v = serde_json::from_str::<Value>(text)
                    .map_err(|e| format!("schema {stem} is not JSON: {e}"))
                    .and_then(|s| {
                        jsonschema::options()
                            .should_validate_formats(false)
                            .build(&s)
                            .map_err(|e| format!("schema {stem} does not compile: {e}"))
                    });
                (*stem, v)
            })
            .collect()
    })
}

/// Validate `instance` against schema `stem`; the errors (masked) on failure.
pub fn check(stem: &str, instance: &Value) -> Result<(), Vec<String>> {
    let Some(v) = validators().get(stem) else {
        return Err(vec![format!("no embedded schema named {stem}")]);
    };
    let v = v.as_ref().map_err(|e| vec![e.clone()])?;
    let errors: Vec<String> = v
        .iter_errors(instance)
        .take(10)
        .map(|e| format!("at `{}`: {}", e.instance_path(), e.masked()))
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_compiles() {
        for (stem, _) in SCHEMAS {
            assert!(validators()[stem].is_ok(), "{stem}");
        }
    }

    #[test]
    fn errors_do_not_echo_values() {
        let bad = serde_json::json!({"lease": {"id": 5, "expiresAt": "crp-canary-secret"}, "proxyBaseUrl": 1});
        let errs = check("use-result", &bad).unwrap_err();
        assert!(errs.iter().all(|e| !e.contains("crp-canary-secret")), "{errs:?}");
    }
}
