//! Proof that the runner catches real faults: a small in-test provider (tests/support/broken.rs)
//! passes the whole Full tier when correct, and each deliberate fault is failed by the case
//! named for it.

mod support;

use crp_conformance::catalog::{Level, Tier};
use crp_conformance::echo::EchoServer;
use crp_conformance::runner::{Outcome, RunConfig, RunReport, Target};
use crp_core::fixtures::Fixtures;
use support::broken::{Fault, Provider};

async fn run_against(fault: Fault, only: &[&str]) -> RunReport {
    let echo = EchoServer::start("127.0.0.1:0").await.expect("echo");
    let fixtures = Fixtures::conformance(&echo.addr.to_string());
    let provider = Provider::start(fixtures.clone(), fault).await;
    let mut cfg = RunConfig::new(Target::Http { url: provider.base.clone(), headers: vec![], signer: None });
    cfg.tier = Some(Tier::Full);
    cfg.fixtures = Some(fixtures);
    cfg.echo = Some(echo);
    cfg.only = only.iter().map(|s| s.to_string()).collect();
    let report = crp_conformance::run(cfg).await;
    drop(provider);
    report
}

fn explain(r: &RunReport) -> String {
    crp_conformance::report::text(r, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn correct_provider_passes_the_full_tier() {
    let r = run_against(Fault::None, &[]).await;
    assert_eq!(r.exit_code(), 0, "{}", explain(&r));
    let not_passed: Vec<String> = r
        .cases
        .iter()
        .filter(|c| c.outcome != Outcome::Pass)
        .map(|c| format!("{} {:?} {:?}", c.meta.id, c.outcome, c.reason))
        .collect();
    // This provider speaks only 0.2, so the v0.1 cases are not selected; everything else passes.
    assert!(not_passed.is_empty(), "{not_passed:#?}\n{}", explain(&r));
    assert!(r.cases.len() > 80, "only {} cases ran", r.cases.len());
    assert!(r.duration_ms < 15_000, "a Full run took {} ms", r.duration_ms);
}

async fn caught(fault: Fault, case: &str) {
    caught_all(fault, &[case]).await;
}

async fn caught_all(fault: Fault, cases: &[&str]) {
    // Only the cases named for the fault (and the final sweep), so each proof takes well under
    // a second; the correct configuration above runs the whole tier.
    let mut only: Vec<&str> = cases.to_vec();
    only.push("secrecy.transcript");
    let r = run_against(fault, &only).await;
    for case in cases {
        check_caught(&r, fault, case);
    }
}

fn check_caught(r: &RunReport, fault: Fault, case: &str) {
    let c = r.case(case).unwrap_or_else(|| panic!("case {case} did not run\n{}", explain(r)));
    assert_eq!(c.outcome, Outcome::Fail, "{fault:?} should fail {case}\n{}", explain(r));
    assert!(c.reason.as_deref().is_some_and(|m| !m.is_empty()), "no reason given");
    assert!(!c.evidence.is_empty(), "no evidence recorded for {case}");
    if c.meta.level == Level::Must {
        assert_eq!(r.exit_code(), 1, "a MUST failure must make the run fail");
    }
    // Evidence never carries a canary in the clear.
    let json = serde_json::to_string(r).expect("json");
    assert!(!json.contains("crp-canary-"), "a report carries a canary in the clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaking_the_secret_in_use_is_caught() {
    caught(Fault::LeakSecretInUse, "use.no-secret-in-result").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipping_the_cascade_is_caught() {
    caught_all(Fault::SkipCascade, &["revoke.cascade-affected-leases", "revoke.cascade-ends-proxy"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_granting_ttl_is_caught() {
    caught(Fault::OverGrantTtl, "use.ttl-within-max").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_the_url_on_renew_is_caught() {
    caught(Fault::UrlChangesOnRenew, "lease.renew-keeps-url").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ignoring_revocation_in_the_proxy_is_caught() {
    caught(Fault::IgnoreRevocationInProxy, "revoke.ends-proxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_version_code_is_caught() {
    caught(Fault::WrongVersionCode, "version.mismatch-code").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_lease_ids_are_caught() {
    caught(Fault::ShortLeaseIds, "use.lease-id-entropy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_in_error_data_is_caught() {
    caught(Fault::SecretInErrorData, "errors.no-secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unbounded_delegation_is_caught() {
    caught(Fault::UnboundedDelegation, "delegation.depth-bounded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn granting_unknown_scopes_is_caught() {
    caught(Fault::GrantsUnknownScopes, "use.unknown-scope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_audit_is_caught() {
    caught(Fault::NoAudit, "audit.use-recorded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_provider_cannot_run() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let echo = EchoServer::start("127.0.0.1:0").await.expect("echo");
    let mut cfg = RunConfig::new(Target::Http { url: format!("http://127.0.0.1:{port}"), headers: vec![], signer: None });
    cfg.echo = Some(echo);
    let r = crp_conformance::run(cfg).await;
    assert_eq!(r.exit_code(), 2, "{}", explain(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_report_format_carries_the_failure_without_the_secret() {
    use crp_conformance::report::{Format, render};
    let r = run_against(Fault::LeakSecretInUse, &["use.no-secret-in-result", "capability."]).await;
    assert_eq!(r.exit_code(), 1);
    for f in [Format::Text, Format::Json, Format::Junit, Format::Html] {
        let out = render(&r, f, true);
        assert!(out.contains("use.no-secret-in-result"), "{f:?}");
        assert!(!out.contains("crp-canary-"), "{f:?} carries a canary in the clear");
    }
    let junit = render(&r, Format::Junit, false);
    assert!(junit.starts_with("<?xml") && junit.contains("<failure") && junit.trim_end().ends_with("</testsuites>"));
    let html = render(&r, Format::Html, false);
    assert!(html.starts_with("<!doctype html>") && !html.contains("<script") && !html.contains(" src="), "not self-contained");
    let json: serde_json::Value = serde_json::from_str(&render(&r, Format::Json, false)).expect("json report");
    assert_eq!(json["totals"]["blocking"], 1);
    let ev = json["cases"].as_array().and_then(|c| c.iter().find(|c| c["id"] == "use.no-secret-in-result")).expect("case");
    assert!(ev["evidence"].as_array().is_some_and(|e| e.iter().any(|x| x["kind"] == "request")));
    assert!(ev["reason"].as_str().is_some_and(|m| m.contains("canary:primary")), "the reason names the leaked secret: {}", ev["reason"]);
}
