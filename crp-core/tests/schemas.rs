//! Schema drift: every schema `crp_core::schema::all()` exports must be committed under
//! `schemas/` exactly as `crp_core::schema::render` writes it, must be a valid draft 2020-12
//! schema, and must not carry doc examples (code blocks) in its descriptions.

use std::collections::BTreeSet;
use std::path::PathBuf;

const REGENERATE: &str = "run `cargo run -p crp-core --example generate-schemas` and commit schemas/";

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

/// The first differing line, for a readable failure.
fn first_difference(committed: &str, generated: &str) -> String {
    for (i, (a, b)) in committed.lines().zip(generated.lines()).enumerate() {
        if a != b {
            return format!("line {}: committed `{}`, generated `{}`", i + 1, a.trim(), b.trim());
        }
    }
    format!(
        "committed has {} lines, generated {}",
        committed.lines().count(),
        generated.lines().count()
    )
}

#[test]
fn committed_schemas_match_the_rust_types() {
    let dir = schemas_dir();
    let mut failures = Vec::new();
    for (stem, schema) in crp_core::schema::all() {
        let path = dir.join(crp_core::schema::file_name(stem));
        let generated = crp_core::schema::render(&schema);
        match std::fs::read_to_string(&path) {
            Err(e) => failures.push(format!("{}: cannot read ({e})", path.display())),
            Ok(committed) if committed != generated => failures.push(format!(
                "{} is out of date with the Rust types ({})",
                path.display(),
                first_difference(&committed, &generated)
            )),
            Ok(_) => {}
        }
    }
    assert!(failures.is_empty(), "schema drift:\n  {}\n{REGENERATE}", failures.join("\n  "));
}

#[test]
fn no_stale_schema_files() {
    let expected: BTreeSet<String> =
        crp_core::schema::all().iter().map(|(stem, _)| crp_core::schema::file_name(stem)).collect();
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(schemas_dir()).expect("schemas/ exists") {
        let name = entry.expect("readable dir entry").file_name().to_string_lossy().into_owned();
        if name.ends_with(".schema.json") && !expected.contains(&name) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/ holds files no Rust type generates: {stale:?}; delete them, then {REGENERATE}"
    );
}

#[test]
fn every_schema_is_valid_draft_2020_12() {
    let mut failures = Vec::new();
    for (stem, schema) in crp_core::schema::all() {
        let value = schema.as_value();
        if value.get("$schema").and_then(|v| v.as_str())
            != Some("https://json-schema.org/draft/2020-12/schema")
        {
            failures.push(format!("{stem}: $schema is not draft 2020-12"));
        }
        if let Err(e) = jsonschema::draft202012::meta::validate(value) {
            failures.push(format!("{stem}: not a valid draft 2020-12 schema: {e}"));
        }
        if let Err(e) = jsonschema::draft202012::new(value) {
            failures.push(format!("{stem}: does not compile: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn descriptions<'a>(value: &'a serde_json::Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "description" {
                    if let Some(s) = v.as_str() {
                        out.push((path.clone(), s));
                    }
                } else {
                    descriptions(v, format!("{path}/{k}"), out);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                descriptions(v, format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn descriptions_carry_no_code_blocks() {
    let mut failures = Vec::new();
    for (stem, schema) in crp_core::schema::all() {
        let mut found = Vec::new();
        descriptions(schema.as_value(), String::new(), &mut found);
        assert!(!found.is_empty(), "{stem}: no descriptions at all");
        for (path, d) in found {
            if d.contains("```") || d.contains("assert") || d.contains("unwrap()") {
                failures.push(format!("{stem}{path}: {d}"));
            }
        }
    }
    assert!(failures.is_empty(), "descriptions with code in them:\n{}", failures.join("\n"));
}

#[test]
fn the_exported_list_is_stable_and_unique() {
    let stems: Vec<&str> = crp_core::schema::all().iter().map(|(s, _)| *s).collect();
    let unique: BTreeSet<&str> = stems.iter().copied().collect();
    assert_eq!(unique.len(), stems.len(), "duplicate stems: {stems:?}");
    for required in [
        "capability", "use-params", "use-result", "resolve-params", "resolve-result",
        "lease-params", "lease-result", "revoke-params", "revoke-result", "list-params",
        "list-result", "error", "jsonrpc-request", "jsonrpc-response",
    ] {
        assert!(unique.contains(required), "schema `{required}` is no longer exported");
    }
}
