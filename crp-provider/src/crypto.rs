//! The vault's key hierarchy and every cryptographic primitive the vault uses.
//!
//! ```text
//! passphrase --Argon2id(salt, m, t, p)--\
//!                                         >-- KEK --XChaCha20-Poly1305 wrap--> data key (random 256 bit)
//! vault.key (256 bit) --HMAC-SHA256------/                                         |
//!                                                      seal/open every credential value, every
//!                                                      sensitive config blob, and the audit MAC key
//! ```
//!
//! - The data key is random and never derived from the passphrase, so changing the passphrase
//!   only re-wraps 32 bytes.
//! - The wrapped key, the KDF parameters and the salt live in the database (`meta.key_envelope`);
//!   without the passphrase or keyfile they reveal nothing.
//! - Every sealed blob carries a fresh 192-bit nonce and is bound by AAD to what it is
//!   (purpose, key, version), so a ciphertext moved to another row or version fails to open.
//! - A wrong passphrase or keyfile fails the AEAD tag of the wrapped data key: that is
//!   [`CryptoError::WrongKey`], never an empty vault.
//!
//! This module never logs, prints or formats key material; keys live in `Zeroizing` buffers.

use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Format byte in front of every sealed blob.
const SEAL_V1: u8 = 1;
const NONCE_LEN: usize = 24;

/// Errors of this module. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The passphrase or keyfile does not unwrap this vault's data key.
    #[error("wrong passphrase or keyfile for this vault")]
    WrongKey,
    /// A sealed blob failed authentication (tampered, moved, or another vault's).
    #[error("sealed record failed authentication ({0})")]
    Tampered(String),
    /// A malformed envelope, keyfile or parameter.
    #[error("{0}")]
    Invalid(String),
    /// The OS random generator failed.
    #[error("system random generator failed")]
    Rng,
}

/// Fill `buf` from the OS CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Rng)
}

/// `prefix` followed by `bytes` random bytes as lowercase hex (16 bytes = 128 bits).
pub fn random_hex_id(prefix: &str, bytes: usize) -> Result<String, CryptoError> {
    let mut b = vec![0u8; bytes];
    random_bytes(&mut b)?;
    Ok(format!("{prefix}{}", hex::encode(b)))
}

/// `prefix`, the time in milliseconds as 12 hex digits, then `random` random bytes as hex: ids
/// made at about the same time sort together, so a B-tree indexed by them takes new ones at
/// its right edge (a few pages per commit) instead of on a random page each. The time is no
/// secret (leases carry their `issuedAt`); uniqueness rests on the random part.
pub fn time_ordered_hex_id(prefix: &str, now_ms: i64, random: usize) -> Result<String, CryptoError> {
    // 48 bits of milliseconds last until the year 10889.
    let t = (now_ms.max(0) as u64) & 0xffff_ffff_ffff;
    random_hex_id(&format!("{prefix}{t:012x}"), random)
}

/// `prefix` followed by `bytes` random bytes in base64url (tokens: 32 bytes = 256 bits).
pub fn random_token(prefix: &str, bytes: usize) -> Result<Zeroizing<String>, CryptoError> {
    let mut b = Zeroizing::new(vec![0u8; bytes]);
    random_bytes(&mut b)?;
    Ok(Zeroizing::new(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&*b))))
}

/// Lowercase hex SHA-256 of `data`: how bearer tokens are stored.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// A 256-bit symmetric key in a zeroizing buffer. `Debug` prints nothing.
#[derive(Clone)]
pub struct Key32(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32([REDACTED])")
    }
}

impl Key32 {
    /// A fresh random key.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        random_bytes(&mut *k)?;
        Ok(Self(k))
    }

    /// From exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 32] = b.try_into().map_err(|_| CryptoError::Invalid("key must be 32 bytes".into()))?;
        Ok(Self(Zeroizing::new(arr)))
    }

    /// The raw bytes (only for HMAC keys and wrapping).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        // 32 bytes is the cipher's key length, so this cannot fail.
        XChaCha20Poly1305::new_from_slice(&self.0[..]).unwrap_or_else(|_| unreachable!())
    }

    /// Seal `plaintext` bound to `aad`: `0x01 || nonce(24) || ciphertext+tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let ct = self
            .cipher()
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad })
            .map_err(|_| CryptoError::Invalid("encryption failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEAL_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Open a blob made by [`Key32::seal`] with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEAL_V1 {
            return Err(CryptoError::Tampered("malformed sealed record".into()));
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| CryptoError::Tampered("malformed nonce".into()))?;
        self.cipher()
            .decrypt(&XNonce::from(nonce), Payload { msg: &sealed[1 + NONCE_LEN..], aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Tampered("authentication tag mismatch".into()))
    }
}

/// The AAD for a sealed blob: `crp-vault/v1/{purpose}\0{name}\0{version}`.
pub fn aad(purpose: &str, name: &str, version: i64) -> Vec<u8> {
    format!("crp-vault/v1/{purpose}\0{name}\0{version}").into_bytes()
}

/// Argon2id cost parameters (stored with the wrapped key so they can be raised later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl Default for KdfParams {
    /// OWASP's Argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        Self { m: 19 * 1024, t: 2, p: 1 }
    }
}

/// How the key-encryption key is obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kek", rename_all = "snake_case")]
pub enum KekSource {
    /// Argon2id over a passphrase.
    Argon2id {
        /// Cost.
        params: KdfParams,
        /// 16-byte salt, base64.
        salt: String,
    },
    /// HMAC-SHA256 over the 256-bit keyfile (`vault.key`).
    Keyfile,
}

/// The stored wrapped data key (`meta.key_envelope`, JSON). Contains nothing secret in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEnvelope {
    /// Envelope format.
    pub v: u32,
    /// Vault identifier, bound into the AAD.
    pub vault_id: String,
    /// KEK derivation.
    #[serde(flatten)]
    pub source: KekSource,
    /// Sealed data key, base64.
    pub wrapped: String,
}

/// What unlocks the vault, in memory.
pub enum KekInput<'a> {
    /// A passphrase.
    Passphrase(&'a str),
    /// The 32 keyfile bytes.
    Keyfile(&'a Key32),
}

fn derive_kek(source: &KekSource, input: &KekInput<'_>) -> Result<Key32, CryptoError> {
    match (source, input) {
        (KekSource::Argon2id { params, salt }, KekInput::Passphrase(pass)) => {
            let salt = STANDARD.decode(salt).map_err(|_| CryptoError::Invalid("bad KDF salt".into()))?;
            let p = Params::new(params.m, params.t, params.p, Some(32))
                .map_err(|e| CryptoError::Invalid(format!("bad KDF parameters: {e}")))?;
            let mut out = Zeroizing::new([0u8; 32]);
            Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
                .hash_password_into(pass.as_bytes(), &salt, &mut *out)
                .map_err(|e| CryptoError::Invalid(format!("key derivation failed: {e}")))?;
            Ok(Key32(out))
        }
        (KekSource::Keyfile, KekInput::Keyfile(k)) => {
            Ok(Key32(Zeroizing::new(hmac_sha256(k.bytes(), &[b"crp-vault/v1/kek"]))))
        }
        (KekSource::Argon2id { .. }, KekInput::Keyfile(_)) => Err(CryptoError::Invalid(
            "this vault is unlocked with a passphrase (CRP_PASSPHRASE or --passphrase-file), not a keyfile".into(),
        )),
        (KekSource::Keyfile, KekInput::Passphrase(_)) => Err(CryptoError::Invalid(
            "this vault is unlocked with its keyfile (vault.key), not a passphrase".into(),
        )),
    }
}

fn envelope_aad(vault_id: &str) -> Vec<u8> {
    aad("data-key", vault_id, 1)
}

impl KeyEnvelope {
    /// Wrap a fresh data key for a new vault.
    pub fn create(vault_id: &str, input: &KekInput<'_>, params: KdfParams) -> Result<(Self, Key32), CryptoError> {
        let source = match input {
            KekInput::Passphrase(_) => {
                let mut salt = [0u8; 16];
                random_bytes(&mut salt)?;
                KekSource::Argon2id { params, salt: STANDARD.encode(salt) }
            }
            KekInput::Keyfile(_) => KekSource::Keyfile,
        };
        let kek = derive_kek(&source, input)?;
        let data_key = Key32::generate()?;
        let wrapped = kek.seal(&envelope_aad(vault_id), data_key.bytes())?;
        Ok((Self { v: 1, vault_id: vault_id.into(), source, wrapped: STANDARD.encode(wrapped) }, data_key))
    }

    /// Unwrap the data key; a wrong passphrase or keyfile is [`CryptoError::WrongKey`].
    pub fn unwrap_key(&self, input: &KekInput<'_>) -> Result<Key32, CryptoError> {
        if self.v != 1 {
            return Err(CryptoError::Invalid(format!("unsupported key envelope version {}", self.v)));
        }
        let kek = derive_kek(&self.source, input)?;
        let wrapped = STANDARD.decode(&self.wrapped).map_err(|_| CryptoError::Invalid("bad wrapped key".into()))?;
        let raw = kek.open(&envelope_aad(&self.vault_id), &wrapped).map_err(|_| CryptoError::WrongKey)?;
        Key32::from_slice(&raw)
    }

    /// Whether the vault uses a passphrase.
    pub fn uses_passphrase(&self) -> bool {
        matches!(self.source, KekSource::Argon2id { .. })
    }
}

/// Parse a keyfile: 64 hex characters (optionally followed by a newline) or 32 raw bytes.
pub fn parse_keyfile(bytes: &[u8]) -> Result<Key32, CryptoError> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    if let Some(t) = text.filter(|t| t.len() == 64) {
        let raw = Zeroizing::new(hex::decode(t).map_err(|_| CryptoError::Invalid("keyfile is not valid hex".into()))?);
        return Key32::from_slice(&raw);
    }
    if bytes.len() == 32 {
        return Key32::from_slice(bytes);
    }
    Err(CryptoError::Invalid("keyfile must hold 256 bits (64 hex characters)".into()))
}

/// Keyfile text for a key: 64 hex characters and a newline.
pub fn keyfile_text(key: &Key32) -> Zeroizing<String> {
    Zeroizing::new(format!("{}\n", hex::encode(key.bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ordered_ids_sort_by_time_and_stay_unique() {
        let a = time_ordered_hex_id("lease_", 1_700_000_000_000, 16).unwrap();
        let b = time_ordered_hex_id("lease_", 1_700_000_000_001, 16).unwrap();
        let c = time_ordered_hex_id("lease_", 1_700_000_000_001, 16).unwrap();
        assert_eq!(a.len(), 6 + 12 + 32);
        assert!(a[6..].bytes().all(|x| x.is_ascii_hexdigit() && !x.is_ascii_uppercase()));
        assert!(a < b && a < c, "{a} {b} {c}");
        assert_ne!(b, c, "the random part keeps ids of the same millisecond apart");
        assert_eq!(&a[6..18], "018bcfe56800");
    }

    #[test]
    fn seal_open_roundtrip_and_aad_binding() {
        let k = Key32::generate().unwrap();
        let s = k.seal(&aad("cred-value", "a", 1), b"hello").unwrap();
        assert_eq!(&**k.open(&aad("cred-value", "a", 1), &s).unwrap(), b"hello");
        assert!(k.open(&aad("cred-value", "a", 2), &s).is_err());
        assert!(k.open(&aad("cred-value", "b", 1), &s).is_err());
        let other = Key32::generate().unwrap();
        assert!(other.open(&aad("cred-value", "a", 1), &s).is_err());
    }

    #[test]
    fn wrong_passphrase_is_wrong_key() {
        let params = KdfParams { m: 64, t: 1, p: 1 };
        let (env, dk) = KeyEnvelope::create("v1", &KekInput::Passphrase("right"), params).unwrap();
        let again = env.unwrap_key(&KekInput::Passphrase("right")).unwrap();
        assert_eq!(again.bytes(), dk.bytes());
        assert!(matches!(env.unwrap_key(&KekInput::Passphrase("wrong")), Err(CryptoError::WrongKey)));
    }

    #[test]
    fn keyfile_roundtrip_and_wrong_keyfile() {
        let kf = Key32::generate().unwrap();
        let (env, dk) = KeyEnvelope::create("v1", &KekInput::Keyfile(&kf), KdfParams::default()).unwrap();
        let parsed = parse_keyfile(keyfile_text(&kf).as_bytes()).unwrap();
        assert_eq!(env.unwrap_key(&KekInput::Keyfile(&parsed)).unwrap().bytes(), dk.bytes());
        let other = Key32::generate().unwrap();
        assert!(matches!(env.unwrap_key(&KekInput::Keyfile(&other)), Err(CryptoError::WrongKey)));
    }
}
