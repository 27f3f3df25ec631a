//! Ed25519 request signing beyond the known answers in `spec-vectors/signing.json`: key
//! encodings, refusals, nonces, and that every signed component matters.

use crp_core::signing::*;

const HOST: &str = "127.0.0.1:7700";
const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"crp/list"}"#;

fn key(seed: u8) -> AgentSigningKey {
    AgentSigningKey::from_bytes(&[seed; 32])
}

#[test]
fn private_keys_round_trip_through_pkcs8_pem() {
    let k = generate_key().expect("OS randomness");
    let pem = private_key_to_pem(&k).expect("encodes");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{}", pem.as_str());
    let back = private_key_from_pem(&pem).expect("decodes");
    assert_eq!(back.to_bytes(), k.to_bytes());
    assert!(private_key_from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err());
    assert!(private_key_from_pem("not a pem").is_err());
}

#[test]
fn public_keys_round_trip_and_bad_ones_are_refused() {
    let k = key(7);
    let encoded = encode_public_key(&k.verifying_key());
    assert_eq!(parse_public_key(&encoded).expect("parses"), k.verifying_key());
    assert_eq!(parse_public_key(&format!(" {encoded}\n")).expect("trimmed"), k.verifying_key());
    assert!(parse_public_key("!!!").unwrap_err().contains("base64"));
    assert!(parse_public_key("AAAA").unwrap_err().contains("32 bytes"));
}

#[test]
fn every_signed_component_matters() {
    let k = key(1);
    let vk = k.verifying_key();
    let nonce = "AAECAwQFBgcICQoLDA0ODw".to_string();
    let h = sign_request(&k, "agent-1", "POST", HOST, "/crp?x=1", BODY, 1_700_000_000, nonce.clone());
    let ok = canonical_string("POST", HOST, "/crp?x=1", 1_700_000_000, &nonce, BODY);
    assert!(verify(&vk, &ok, &h.signature).is_ok());
    // Case of method and host does not matter (they are normalised before signing).
    assert!(verify(&vk, &canonical_string("post", "127.0.0.1:7700", "/crp?x=1", 1_700_000_000, &nonce, BODY), &h.signature).is_ok());
    for (what, tampered) in [
        ("method", canonical_string("PUT", HOST, "/crp?x=1", 1_700_000_000, &nonce, BODY)),
        ("host", canonical_string("POST", "127.0.0.1:7701", "/crp?x=1", 1_700_000_000, &nonce, BODY)),
        ("path", canonical_string("POST", HOST, "/crp", 1_700_000_000, &nonce, BODY)),
        ("query", canonical_string("POST", HOST, "/crp?x=2", 1_700_000_000, &nonce, BODY)),
        ("timestamp", canonical_string("POST", HOST, "/crp?x=1", 1_700_000_001, &nonce, BODY)),
        ("nonce", canonical_string("POST", HOST, "/crp?x=1", 1_700_000_000, "AAECAwQFBgcICQoLDA0OEA", BODY)),
        ("body", canonical_string("POST", HOST, "/crp?x=1", 1_700_000_000, &nonce, b"{}")),
    ] {
        assert_eq!(verify(&vk, &tampered, &h.signature), Err("bad signature"), "changing the {what} must break the signature");
    }
    // Another agent's key does not verify it; garbage signatures say only "bad signature".
    assert_eq!(verify(&key(2).verifying_key(), &ok, &h.signature), Err("bad signature"));
    assert_eq!(verify(&vk, &ok, "not base64!"), Err("bad signature"));
    assert_eq!(verify(&vk, &ok, "AAAA"), Err("bad signature"));
}

#[test]
fn headers_carry_what_was_signed() {
    let h = sign_request(&key(3), "agent-9", "POST", HOST, "/crp", BODY, 42, "bm9uY2Utbm9uY2Utbm9uY2U".into());
    let pairs = h.pairs();
    let names: Vec<&str> = pairs.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["x-crp-agent", "x-crp-timestamp", "x-crp-nonce", "x-crp-signature"]);
    assert_eq!(pairs[0].1, "agent-9");
    assert_eq!(pairs[1].1, "42");
    assert_eq!(pairs[2].1, "bm9uY2Utbm9uY2Utbm9uY2U");
    assert_eq!(pairs[3].1, h.signature);
}

#[test]
fn nonces_are_fresh_and_well_formed() {
    let a = new_nonce().expect("OS randomness");
    let b = new_nonce().expect("OS randomness");
    assert_ne!(a, b);
    assert_eq!(a.len(), 22, "16 bytes in unpadded base64url");
    assert!(nonce_is_well_formed(&a));
    for bad in ["", "short", "has spaces in it here", "plus+and/slash/base64==", &"x".repeat(65)] {
        assert!(!nonce_is_well_formed(bad), "{bad:?}");
    }
}
