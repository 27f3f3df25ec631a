//! Ed25519 signed requests: how an agent proves who it is on every HTTP call.
//!
//! The signed string is newline-joined with a domain-separation tag, binds the host and the
//! query (both unsigned in the scheme we learned from), and hashes the exact body bytes:
//!
//! ```text
//! CRP-SIG-V1\n{METHOD}\n{host}\n{path and query}\n{timestamp}\n{nonce}\n{hex sha256(body)}
//! ```
//!
//! Headers: `X-CRP-Agent`, `X-CRP-Timestamp` (unix seconds), `X-CRP-Nonce` (16 random bytes,
//! base64url without padding), `X-CRP-Signature` (standard base64 of the 64-byte signature).
//! Public keys travel as standard base64 of the raw 32 bytes; private keys live in PKCS#8 PEM.
//!
//! ```
//! use crp_core::signing::*;
//! let key = generate_key().unwrap();
//! let h = sign_request(&key, "agent-1", "POST", "127.0.0.1:7700", "/crp", b"{}", 1_700_000_000, new_nonce().unwrap());
//! let public = encode_public_key(&key.verifying_key());
//! let canonical = canonical_string("POST", "127.0.0.1:7700", "/crp", h.timestamp, &h.nonce, b"{}");
//! assert!(verify(&parse_public_key(&public).unwrap(), &canonical, &h.signature).is_ok());
//! ```

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::{SigningKey as AgentSigningKey, VerifyingKey as AgentVerifyingKey};

/// Domain-separation tag, first line of the signed string.
pub const SIGNATURE_TAG: &str = "CRP-SIG-V1";
/// Header naming the agent.
pub const HEADER_AGENT: &str = "x-crp-agent";
/// Header with unix seconds.
pub const HEADER_TIMESTAMP: &str = "x-crp-timestamp";
/// Header with the one-shot nonce.
pub const HEADER_NONCE: &str = "x-crp-nonce";
/// Header with the signature.
pub const HEADER_SIGNATURE: &str = "x-crp-signature";
/// Accepted clock skew, seconds either way.
pub const WINDOW_SECONDS: i64 = 300;

/// The four header values of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `X-CRP-Agent`.
    pub agent: String,
    /// `X-CRP-Timestamp`.
    pub timestamp: i64,
    /// `X-CRP-Nonce`.
    pub nonce: String,
    /// `X-CRP-Signature`.
    pub signature: String,
}

impl SignedHeaders {
    /// `(name, value)` pairs ready to add to a request.
    pub fn pairs(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_AGENT, self.agent.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }
}

/// The exact string that is signed.
pub fn canonical_string(
    method: &str,
    host: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    let body_hash = hex::encode(Sha256::digest(body));
    format!(
        "{SIGNATURE_TAG}\n{}\n{}\n{path_and_query}\n{timestamp}\n{nonce}\n{body_hash}",
        method.to_ascii_uppercase(),
        host.to_ascii_lowercase()
    )
}

/// 16 random bytes, base64url without padding (22 characters).
pub fn new_nonce() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

/// Whether a nonce has the shape [`new_nonce`] produces (16 to 64 base64url characters).
pub fn nonce_is_well_formed(nonce: &str) -> bool {
    (16..=64).contains(&nonce.len())
        && nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh Ed25519 key from the OS random source.
pub fn generate_key() -> Result<SigningKey, getrandom::Error> {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Sign a request; `now` is unix seconds.
#[allow(clippy::too_many_arguments)]
pub fn sign_request(
    key: &SigningKey,
    agent: &str,
    method: &str,
    host: &str,
    path_and_query: &str,
    body: &[u8],
    now: i64,
    nonce: String,
) -> SignedHeaders {
    let canonical = canonical_string(method, host, path_and_query, now, &nonce, body);
    let sig = key.sign(canonical.as_bytes());
    SignedHeaders { agent: agent.into(), timestamp: now, nonce, signature: STANDARD.encode(sig.to_bytes()) }
}

/// Verify a signature over `canonical`. The error says only "bad signature".
pub fn verify(key: &VerifyingKey, canonical: &str, signature_b64: &str) -> Result<(), &'static str> {
    let bytes = STANDARD.decode(signature_b64.trim()).map_err(|_| "bad signature")?;
    let sig = Signature::from_slice(&bytes).map_err(|_| "bad signature")?;
    key.verify(canonical.as_bytes(), &sig).map_err(|_| "bad signature")
}

/// Standard base64 of the raw 32-byte public key.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Parse a public key in the form [`encode_public_key`] writes.
pub fn parse_public_key(b64: &str) -> Result<VerifyingKey, String> {
    let bytes = STANDARD.decode(b64.trim()).map_err(|_| "public key is not standard base64".to_string())?;
    let raw: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("public key must be 32 bytes, got {}", bytes.len()))?;
    VerifyingKey::from_bytes(&raw).map_err(|_| "public key is not a valid Ed25519 point".to_string())
}

/// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) of a signing key, in a zeroizing string.
pub fn private_key_to_pem(key: &SigningKey) -> Result<zeroize::Zeroizing<String>, String> {
    key.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| format!("cannot encode private key: {e}"))
}

/// Read a PKCS#8 PEM Ed25519 private key. Anything else is refused.
pub fn private_key_from_pem(pem: &str) -> Result<SigningKey, String> {
    SigningKey::from_pkcs8_pem(pem).map_err(|_| "not an Ed25519 PKCS#8 PEM private key".to_string())
}
