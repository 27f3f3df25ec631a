//! The committed fixture file is exactly what `crp-conformance fixtures` prints, and the CLI's
//! `list` shows every case.

use std::process::Command;

use crp_core::fixtures::{DEFAULT_UPSTREAM, Fixtures};

#[test]
fn committed_fixture_file_matches_the_generator() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec-vectors/fixtures.json");
    let committed = std::fs::read_to_string(path).expect("spec-vectors/fixtures.json");
    let parsed = Fixtures::from_json(&committed).expect("the committed fixtures validate");
    assert_eq!(
        parsed,
        Fixtures::conformance(DEFAULT_UPSTREAM),
        "spec-vectors/fixtures.json is stale: run `cargo run -p crp-conformance -- fixtures > spec-vectors/fixtures.json`"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_crp-conformance")).arg("fixtures").output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), committed.trim());
}

#[test]
fn fixtures_cli_uses_the_upstream_address() {
    let out = Command::new(env!("CARGO_BIN_EXE_crp-conformance"))
        .args(["fixtures", "--upstream", "127.0.0.1:4242"])
        .output()
        .expect("run");
    let f = Fixtures::from_json(&String::from_utf8_lossy(&out.stdout)).expect("valid");
    assert_eq!(f.upstream.address, "127.0.0.1:4242");
    assert!(f.credentials.iter().all(|c| c.upstream.starts_with("http://127.0.0.1:4242/")));
}

#[test]
fn list_shows_every_case_with_tier_section_and_level() {
    let out = Command::new(env!("CARGO_BIN_EXE_crp-conformance")).arg("list").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for c in crp_conformance::cases::all() {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(c.meta.id)).unwrap_or_else(|| panic!("{} not listed", c.meta.id));
        assert!(line.contains(c.meta.tier.as_str()) && line.contains(c.meta.level.as_str()) && line.contains(c.meta.section), "{line}");
    }
}

#[test]
fn run_without_a_target_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_crp-conformance")).arg("run").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}
