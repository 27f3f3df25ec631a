//! Ed25519 request signing (`--agent-key`, agent id from the sibling identity.json) against our
//! provider in its normal, authenticated mode: an approved agent loaded with the fixtures
//! passes the Full tier; without the key the provider refuses the runner.

use std::process::Output;

use crp_core::fixtures::Fixtures;
use crp_core::signing::{encode_public_key, generate_key, private_key_to_pem};
use crp_provider::agents::AgentStatus;
use crp_provider::http::ServeConfig;
use crp_provider::vault::{OpenOptions, Unlock, Vault};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn conformance(args: Vec<String>) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_crp-conformance"))
        .arg("run")
        .args(args)
        .output()
        .await
        .expect("run crp-conformance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_pass_full_tier_and_unsigned_ones_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    Vault::init(&home, Unlock::Keyfile(home.join("vault.key"))).await.expect("init");
    let vault = Vault::open(OpenOptions::new(&home)).await.expect("open");

    // An agent: key pair, bootstrap, register, approve.
    let key = generate_key().expect("key");
    let boot = vault.bootstrap_agent("crp-conformance", &[], &["crp:*".to_string(), "audit:read".to_string()], 600).await.expect("bootstrap");
    let agent = vault.register_agent(&boot.token, &encode_public_key(&key.verifying_key()), None).await.expect("register");
    vault.set_agent_status(&agent.id, AgentStatus::Active).await.expect("approve");

    // The fixtures, granted to that agent id.
    let upstream = format!("127.0.0.1:{}", free_port());
    let mut f = Fixtures::conformance(&upstream);
    let default_agent = f.agents[0].id.clone();
    f.agents[0].id = agent.id.clone();
    for c in &mut f.credentials {
        for a in &mut c.access {
            if a.agent == default_agent {
                a.agent = agent.id.clone();
            }
        }
    }
    vault.load_fixtures(&f).await.expect("load fixtures");
    let fixtures = tmp.path().join("fixtures.json");
    std::fs::write(&fixtures, f.to_json_pretty()).expect("write");

    let cfg = ServeConfig { listen: "127.0.0.1:0".parse().expect("addr"), dev: false, ..ServeConfig::default() };
    let server = crp_provider::http::start(vault.clone(), cfg).await.expect("start");
    let base = server.base_url();

    // The identity as crp-mcp stores it: private.pem next to identity.json.
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("private.pem"), private_key_to_pem(&key).expect("pem").as_bytes()).expect("pem");
    std::fs::write(dir.join("identity.json"), serde_json::json!({"agentId": agent.id}).to_string()).expect("identity");

    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--http", &base, "--tier", "full", "--upstream", &upstream, "--audit-wait", "6", "--fixtures"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(fixtures.display().to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let key_path = dir.join("private.pem").display().to_string();
    let signed = conformance(common(&["--agent-key", &key_path])).await;
    let text = String::from_utf8_lossy(&signed.stdout);
    assert_eq!(signed.status.code(), Some(0), "signed run:\n{text}\n{}", String::from_utf8_lossy(&signed.stderr));

    let unsigned = conformance(common(&["--only", "use.result-shape"])).await;
    let text = String::from_utf8_lossy(&unsigned.stdout);
    assert_ne!(unsigned.status.code(), Some(0), "an unsigned run must not pass:\n{text}");
    assert!(text.contains("--agent-key"), "the report should say how to authenticate:\n{text}");

    server.shutdown().await;
    vault.shutdown().await;
}
