//! The messages exported as JSON Schema (draft 2020-12), one file each under `schemas/`.
//!
//! The list lives here so that the generator (`cargo run -p crp-core --example
//! generate-schemas`), the drift test and the vector runner agree on it. Descriptions come
//! from the doc comments with their code examples removed (see [`strip_code_blocks`]).
//!
//! ```
//! let all = crp_core::schema::all();
//! let (stem, schema) = &all[1];
//! assert_eq!(*stem, "use-params");
//! assert_eq!(crp_core::schema::file_name(stem), "use-params.schema.json");
//! let text = crp_core::schema::render(schema);
//! assert!(text.contains("\"$schema\": \"https://json-schema.org/draft/2020-12/schema\""));
//! assert!(text.ends_with('\n'));
//! ```

use schemars::transform::{Transform, transform_subschemas};
use schemars::{JsonSchema, Schema, generate::SchemaSettings};

use crate::error::CrpError;
use crate::jsonrpc::{Request, Response};
use crate::types::*;

fn schema_of<T: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12()
        .with_transform(StripCodeBlocksTransform)
        .into_generator()
        .into_root_schema_for::<T>()
}

/// Removes fenced code blocks (doc examples) from every `description`.
#[derive(Debug, Clone, Copy)]
struct StripCodeBlocksTransform;

impl Transform for StripCodeBlocksTransform {
    fn transform(&mut self, schema: &mut Schema) {
        if let Some(obj) = schema.as_object_mut() {
            if let Some(serde_json::Value::String(d)) = obj.get("description") {
                let stripped = reflow(&strip_code_blocks(d));
                if stripped.is_empty() {
                    obj.remove("description");
                } else {
                    obj.insert("description".into(), stripped.into());
                }
            }
            if let Some(serde_json::Value::Object(defs)) = obj.get_mut("$defs") {
                for def in defs.values_mut() {
                    if let Ok(sub) = <&mut Schema>::try_from(def) {
                        self.transform(sub);
                    }
                }
            }
        }
        transform_subschemas(self, schema);
    }
}

/// Join the hard-wrapped lines of each paragraph (doc comments wrap at 100 columns); list
/// items stay on their own lines.
fn reflow(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut prev_blank = true;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() {
            out.push_str("\n\n");
            prev_blank = true;
            continue;
        }
        if !prev_blank {
            if t.starts_with("- ") || t.starts_with("* ") {
                out.push('\n');
            } else {
                out.push(' ');
            }
        }
        out.push_str(t);
        prev_blank = false;
    }
    out.trim().to_string()
}

/// Drop fenced code blocks (lines from a ```` ``` ```` fence to the closing fence) from a doc
/// text, and the blank lines they leave at the end.
///
/// ```
/// let doc = "A lease.\n\n```\nlet x = 1;\n```\n\nMore.";
/// assert_eq!(crp_core::schema::strip_code_blocks(doc), "A lease.\n\nMore.");
/// ```
pub fn strip_code_blocks(text: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        // Collapse the double blank line a removed block leaves behind.
        if line.trim().is_empty() && out.last().is_some_and(|l| l.trim().is_empty()) {
            continue;
        }
        out.push(line);
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.join("\n")
}

/// `(file stem, schema)` for every exported message, in a stable order.
pub fn all() -> Vec<(&'static str, Schema)> {
    vec![
        ("capability", schema_of::<Capability>()),
        ("use-params", schema_of::<UseParams>()),
        ("use-result", schema_of::<UseResult>()),
        ("resolve-params", schema_of::<ResolveParams>()),
        ("resolve-result", schema_of::<ResolveResult>()),
        ("lease-params", schema_of::<LeaseParams>()),
        ("lease-result", schema_of::<LeaseResult>()),
        ("revoke-params", schema_of::<RevokeParams>()),
        ("revoke-result", schema_of::<RevokeResult>()),
        ("list-params", schema_of::<ListParams>()),
        ("list-result", schema_of::<ListResult>()),
        ("credential-material", schema_of::<CredentialMaterial>()),
        ("error", schema_of::<CrpError>()),
        ("jsonrpc-request", schema_of::<Request>()),
        ("jsonrpc-response", schema_of::<Response>()),
        ("x-vault-store-params", schema_of::<ext::VaultStoreParams>()),
        ("x-vault-store-result", schema_of::<ext::VaultStoreResult>()),
        ("x-vault-retrieve-params", schema_of::<ext::VaultRetrieveParams>()),
        ("x-vault-retrieve-result", schema_of::<ext::VaultRetrieveResult>()),
        ("x-vault-delete-params", schema_of::<ext::VaultDeleteParams>()),
        ("x-vault-delete-result", schema_of::<ext::VaultDeleteResult>()),
        ("x-vault-list-params", schema_of::<ext::VaultListParams>()),
        ("x-vault-list-result", schema_of::<ext::VaultListResult>()),
        ("x-policy-check-params", schema_of::<ext::PolicyCheckParams>()),
        ("x-policy-check-result", schema_of::<ext::PolicyCheckResult>()),
        ("x-audit-query-params", schema_of::<ext::AuditQueryParams>()),
        ("x-audit-query-result", schema_of::<ext::AuditQueryResult>()),
        ("x-whoami-result", schema_of::<ext::WhoamiResult>()),
    ]
}

/// The file name of a schema stem.
pub fn file_name(stem: &str) -> String {
    format!("{stem}.schema.json")
}

/// Pretty JSON with a trailing newline, as committed.
///
/// Object keys are sorted, so the output is the same whether or not another crate in the build
/// turns on serde_json's `preserve_order` feature (cedar-policy does, under `cargo test
/// --workspace`).
pub fn render(schema: &Schema) -> String {
    let value = sort_keys(serde_json::to_value(schema).unwrap_or_default());
    let mut s = serde_json::to_string_pretty(&value).unwrap_or_default();
    s.push('\n');
    s
}

fn sort_keys(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sort_keys(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}
