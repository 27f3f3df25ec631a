//! Redaction of the injected secret from upstream responses.
//!
//! An upstream that echoes request headers (debug endpoints, error pages, httpbin-like
//! services) would hand the credential straight back to the caller the proxy is hiding it
//! from. [`Redactor`] replaces every occurrence of the secret's forms with [`REPLACEMENT`] in a
//! byte stream, also when an occurrence spans chunk boundaries: it keeps the last
//! `longest pattern - 1` bytes of each chunk back until the next chunk (or the end) shows
//! whether they start a match. [`patterns_for`] lists the forms: the raw value, its
//! URL-encoded and JSON-escaped spellings, and for Basic the base64 of `user:pass` and the
//! password alone. Header values are cleaned with [`Redactor::redact_all`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use crp_core::SecretValue;
use crp_core::types::ext::InjectionRule;
use zeroize::Zeroizing;

/// What a redacted secret becomes.
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// Shortest form worth redacting: shorter ones would mangle ordinary text.
const MIN_PATTERN: usize = 4;

/// Percent-encode a query component (RFC 3986 unreserved characters kept): how the proxy
/// injects a query-parameter credential, and so one of the forms redaction looks for.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The byte strings that must not reach the caller for `secret` injected by `rule`.
pub fn patterns_for(secret: &SecretValue, rule: &InjectionRule) -> Vec<Zeroizing<Vec<u8>>> {
    let raw = secret.expose();
    let mut forms: Vec<String> = vec![raw.to_string()];
    let enc = percent_encode(raw);
    if enc != raw {
        forms.push(enc.clone());
        forms.push(enc.replace("%20", "+"));
    }
    if let Ok(json) = serde_json::to_string(raw) {
        let inner = &json[1..json.len() - 1];
        if inner != raw {
            forms.push(inner.to_string());
        }
    }
    if matches!(rule, InjectionRule::Basic) {
        forms.push(STANDARD.encode(raw.as_bytes()));
        if let Some((_, pass)) = raw.split_once(':') {
            forms.push(pass.to_string());
        }
    }
    let mut out: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    for f in forms {
        let f = Zeroizing::new(f.into_bytes());
        if f.len() >= MIN_PATTERN && !out.iter().any(|o| **o == *f) {
            out.push(f);
        }
    }
    // Longest first, so a longer form wins over one of its substrings at the same position.
    out.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out
}

/// A streaming multi-pattern replacer.
pub struct Redactor {
    patterns: Vec<Zeroizing<Vec<u8>>>,
    first: [bool; 256],
    carry: Zeroizing<Vec<u8>>,
    keep: usize,
    /// Number of replacements made so far.
    pub hits: u64,
}

impl Redactor {
    /// A redactor for these patterns (empty patterns are ignored).
    pub fn new(patterns: Vec<Zeroizing<Vec<u8>>>) -> Self {
        let patterns: Vec<_> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
        let mut first = [false; 256];
        for p in &patterns {
            first[p[0] as usize] = true;
        }
        let keep = patterns.iter().map(|p| p.len()).max().unwrap_or(1).saturating_sub(1);
        Self { patterns, first, carry: Zeroizing::new(Vec::new()), keep, hits: 0 }
    }

    /// Whether there is anything to redact.
    pub fn is_active(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Scan `buf`, writing to `out`; stop scanning at `limit` (positions from `limit` on are
    /// only matched if a full pattern starting before `limit` covers them). Returns the index
    /// of the first byte not consumed.
    fn scan(&mut self, buf: &[u8], limit: usize, out: &mut BytesMut) -> usize {
        let mut i = 0;
        let mut plain_start = 0;
        while i < limit {
            if self.first[buf[i] as usize]
                && let Some(p) = self.patterns.iter().find(|p| buf[i..].starts_with(p))
            {
                out.extend_from_slice(&buf[plain_start..i]);
                out.extend_from_slice(REPLACEMENT);
                self.hits += 1;
                i += p.len();
                plain_start = i;
                continue;
            }
            i += 1;
        }
        let consumed = i.max(plain_start);
        out.extend_from_slice(&buf[plain_start..consumed.min(buf.len())]);
        consumed.min(buf.len())
    }

    /// Feed a chunk; returns what may be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if !self.is_active() {
            return Bytes::copy_from_slice(chunk);
        }
        let mut buf = Zeroizing::new(std::mem::take(&mut *self.carry));
        buf.extend_from_slice(chunk);
        let limit = buf.len().saturating_sub(self.keep);
        let mut out = BytesMut::with_capacity(buf.len() + REPLACEMENT.len());
        let consumed = self.scan(&buf, limit, &mut out);
        self.carry.extend_from_slice(&buf[consumed..]);
        out.freeze()
    }

    /// The end of the stream: release what was held back.
    pub fn finish(&mut self) -> Bytes {
        if !self.is_active() || self.carry.is_empty() {
            return Bytes::new();
        }
        let buf = Zeroizing::new(std::mem::take(&mut *self.carry));
        let mut out = BytesMut::with_capacity(buf.len());
        let consumed = self.scan(&buf, buf.len(), &mut out);
        debug_assert_eq!(consumed, buf.len());
        out.freeze()
    }

    /// Redact a complete value (a header value, a buffered body) without touching the stream
    /// state: `None` when it holds no form of the secret (the common case, no copy made),
    /// else the cleaned value and the number of replacements.
    pub fn redact_value(&self, data: &[u8]) -> Option<(Bytes, u64)> {
        let first_hit = (0..data.len())
            .find(|&i| self.first[data[i] as usize] && self.patterns.iter().any(|p| data[i..].starts_with(p)))?;
        let mut out = BytesMut::with_capacity(data.len());
        out.extend_from_slice(&data[..first_hit]);
        let mut i = first_hit;
        let mut plain_start = first_hit;
        let mut hits = 0;
        while i < data.len() {
            if self.first[data[i] as usize]
                && let Some(p) = self.patterns.iter().find(|p| data[i..].starts_with(p))
            {
                out.extend_from_slice(&data[plain_start..i]);
                out.extend_from_slice(REPLACEMENT);
                hits += 1;
                i += p.len();
                plain_start = i;
                continue;
            }
            i += 1;
        }
        out.extend_from_slice(&data[plain_start..]);
        Some((out.freeze(), hits))
    }

    /// Redact a complete value (a header value, a buffered body).
    pub fn redact_all(&mut self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::from(&self.push(data)[..]);
        out.extend_from_slice(&self.finish());
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn red(secret: &str) -> Redactor {
        Redactor::new(patterns_for(&SecretValue::new(secret), &InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() }))
    }

    #[test]
    fn redact_value_copies_only_when_it_must() {
        let r = red("sk-live-SECRET123");
        assert!(r.redact_value(b"nothing to see here").is_none());
        let (out, hits) = r.redact_value(b"x sk-live-SECRET123 y sk-live-SECRET123").unwrap();
        assert_eq!((&out[..], hits), (&b"x [REDACTED] y [REDACTED]"[..], 2));
        let mut streaming = red("sk-live-SECRET123");
        for v in [&b"sk-live-SECRET12"[..], b"a sk-live-SECRET123", b"sk-live-SECRET123sk-live-SECRET123"] {
            let expect = streaming.redact_all(v);
            let got = r.redact_value(v).map(|(b, _)| b).unwrap_or_else(|| Bytes::copy_from_slice(v));
            assert_eq!(got, expect);
        }
    }

    #[test]
    fn replaces_in_one_chunk() {
        let mut r = red("sk-live-SECRET123");
        let out = r.redact_all(b"auth: Bearer sk-live-SECRET123; again sk-live-SECRET123!");
        assert_eq!(&out[..], b"auth: Bearer [REDACTED]; again [REDACTED]!");
        assert_eq!(r.hits, 2);
    }

    #[test]
    fn replaces_across_every_split() {
        let secret = "sk-live-SECRET123";
        let text = format!("xx{secret}yy{secret}");
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let mut r = red(secret);
                let mut out = Vec::new();
                out.extend_from_slice(&r.push(&text.as_bytes()[..cut]));
                out.extend_from_slice(&r.push(&text.as_bytes()[cut..cut2]));
                out.extend_from_slice(&r.push(&text.as_bytes()[cut2..]));
                out.extend_from_slice(&r.finish());
                assert_eq!(out, b"xx[REDACTED]yy[REDACTED]", "cuts {cut} {cut2}");
            }
        }
    }

    #[test]
    fn basic_forms() {
        let s = SecretValue::new("alice:pa55word-xyz");
        let mut r = Redactor::new(patterns_for(&s, &InjectionRule::Basic));
        let b64 = STANDARD.encode("alice:pa55word-xyz");
        let out = r.redact_all(format!("Authorization: Basic {b64} pw=pa55word-xyz").as_bytes());
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(!out.contains(&b64) && !out.contains("pa55word-xyz"), "{out}");
    }

    #[test]
    fn url_encoded_form() {
        let mut r = red("a b/c+d=e");
        let out = r.redact_all(b"GET /x?key=a%20b%2Fc%2Bd%3De HTTP/1.1");
        assert_eq!(&out[..], b"GET /x?key=[REDACTED] HTTP/1.1");
    }

    proptest! {
        #[test]
        fn never_leaks_and_keeps_other_bytes(
            parts in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()), 0..8),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let secret = "S3CR3T-canary-XYZ";
            let mut text = Vec::new();
            let mut expected = Vec::new();
            for (filler, with) in &parts {
                // Filler without the secret's first byte cannot create or extend a match.
                let filler: Vec<u8> = filler.iter().map(|b| if *b == b'S' { b'.' } else { *b }).collect();
                text.extend_from_slice(&filler);
                expected.extend_from_slice(&filler);
                if *with {
                    text.extend_from_slice(secret.as_bytes());
                    expected.extend_from_slice(REPLACEMENT);
                }
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort();
            let mut r = red(secret);
            let mut out = Vec::new();
            let mut prev = 0;
            for c in cuts {
                out.extend_from_slice(&r.push(&text[prev..c]));
                prev = c;
            }
            out.extend_from_slice(&r.push(&text[prev..]));
            out.extend_from_slice(&r.finish());
            prop_assert_eq!(out, expected);
        }
    }
}
