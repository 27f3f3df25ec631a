//! The messages exported as JSON Schema (draft 2020-12), one file each under `schemas/`.
//!
//! The list lives here so that the generator (`cargo run -p crp-core --example
//! generate-schemas`), the drift test and the vector runner agree on it.

use schemars::{JsonSchema, Schema, generate::SchemaSettings};

use crate::error::CrpError;
use crate::jsonrpc::{Request, Response};
use crate::types::*;

fn schema_of<T: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12().into_generator().into_root_schema_for::<T>()
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
    ]
}

/// The file name of a schema stem.
pub fn file_name(stem: &str) -> String {
    format!("{stem}.schema.json")
}

/// Pretty JSON with a trailing newline, as committed.
pub fn render(schema: &Schema) -> String {
    let mut s = serde_json::to_string_pretty(schema).unwrap_or_default();
    s.push('\n');
    s
}
