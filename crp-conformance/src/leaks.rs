//! Finding secrets in what a provider sends back, and masking them in evidence.
//!
//! The runner knows every secret the provider holds (the fixture canaries, and the tokens the
//! echo server minted for the brokered credential). [`LeakScanner::find`] looks for each in
//! the forms a careless provider would leak it in: raw, hex (either case), standard and
//! URL-safe base64 at every byte alignment (so a secret inside a larger encoded string such as
//! `Basic base64(user:pass)` is found too), and percent-encoding. [`LeakScanner::mask`]
//! replaces every such occurrence with `«label»` so reports never carry a secret.

use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use crp_core::fixtures::Fixtures;

/// One place a secret showed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Which secret (e.g. `canary:primary`).
    pub label: String,
    /// In which form (`raw`, `hex`, `base64`, `base64url`, `percent-encoded`).
    pub encoding: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.label, self.encoding)
    }
}

struct Pattern {
    label: String,
    encoding: &'static str,
    needle: String,
    case_insensitive: bool,
}

/// Every secret the runner knows, with their encoded forms.
#[derive(Default)]
pub struct LeakScanner {
    patterns: RwLock<Vec<Pattern>>,
}

impl std::fmt::Debug for LeakScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.patterns.read().map(|p| p.len()).unwrap_or(0);
        write!(f, "LeakScanner({n} patterns)")
    }
}

impl LeakScanner {
    /// A scanner for every canary of `fixtures`.
    pub fn new(fixtures: &Fixtures) -> Self {
        let s = LeakScanner::default();
        for c in &fixtures.credentials {
            let label = format!("canary:{}", c.key.rsplit('/').next().unwrap_or(&c.key));
            let v = c.value.expose();
            s.add(&label, v);
            // For `username:password`, the password alone is the secret that matters.
            if let Some((_, pass)) = v.split_once(':')
                && pass.len() >= 12
            {
                s.add(&label, pass);
            }
        }
        s
    }

    /// Add a secret (e.g. a freshly minted token).
    pub fn add(&self, label: &str, secret: &str) {
        if secret.len() < 8 {
            return;
        }
        let mut forms: Vec<(&'static str, String, bool)> = vec![
            ("raw", secret.to_string(), false),
            ("hex", hex::encode(secret.as_bytes()), true),
        ];
        for (name, engine) in [("base64", &STANDARD_NO_PAD), ("base64url", &URL_SAFE_NO_PAD)] {
            for frag in aligned_base64(secret.as_bytes(), engine) {
                forms.push((name, frag, false));
            }
        }
        let pct = percent_encode(secret);
        if pct != secret {
            forms.push(("percent-encoded", pct, true));
        }
        forms.push(("percent-encoded", secret.bytes().map(|b| format!("%{b:02X}")).collect(), true));
        let Ok(mut p) = self.patterns.write() else { return };
        for (encoding, needle, ci) in forms {
            if needle.len() >= 8 && !p.iter().any(|x| x.needle == needle) {
                p.push(Pattern { label: label.to_string(), encoding, needle, case_insensitive: ci });
            }
        }
    }

    /// Every secret found in `text` (one finding per secret and encoding).
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let Ok(p) = self.patterns.read() else { return vec![] };
        let lower = text.to_ascii_lowercase();
        let mut out: Vec<Finding> = vec![];
        for pat in p.iter() {
            let hit = if pat.case_insensitive {
                lower.contains(&pat.needle.to_ascii_lowercase())
            } else {
                text.contains(&pat.needle)
            };
            let f = Finding { label: pat.label.clone(), encoding: pat.encoding };
            if hit && !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// `text` with every secret form replaced by `«label»` / `«label as encoding»`.
    pub fn mask(&self, text: &str) -> String {
        let Ok(p) = self.patterns.read() else { return "«unavailable»".into() };
        let mut s = text.to_string();
        // Longest needles first so a raw secret is not half-masked by a shorter fragment.
        let mut pats: Vec<&Pattern> = p.iter().collect();
        pats.sort_by_key(|x| std::cmp::Reverse(x.needle.len()));
        for pat in pats {
            let repl = if pat.encoding == "raw" {
                format!("«{}»", pat.label)
            } else {
                format!("«{} as {}»", pat.label, pat.encoding)
            };
            if pat.case_insensitive {
                s = replace_ci(&s, &pat.needle, &repl);
            } else if pat.encoding.starts_with("base64") {
                s = replace_b64(&s, &pat.needle, &repl);
            } else {
                s = s.replace(&pat.needle, &repl);
            }
        }
        s
    }
}

/// The base64 fragments of `secret` that appear whatever bytes precede it: for each of the
/// three alignments, the characters that depend on the secret's bytes only.
fn aligned_base64(secret: &[u8], engine: &base64::engine::GeneralPurpose) -> Vec<String> {
    let mut out = vec![];
    for k in 0..3usize {
        let mut buf = vec![0u8; k];
        buf.extend_from_slice(secret);
        let enc = engine.encode(&buf);
        // Characters 0..ceil(8k/6) carry prefix bits; the last one or two may carry padding.
        let start = (8 * k).div_ceil(6);
        let end = enc.len().saturating_sub(2);
        if end > start + 8 {
            out.push(enc[start..end].to_string());
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Replace `needle` and the few base64 characters around it that carry the secret's edge bits
/// (and padding), so no fragment of the encoding survives.
fn replace_b64(hay: &str, needle: &str, repl: &str) -> String {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || b"+/=-_".contains(&c);
    let bytes = hay.as_bytes();
    let mut out = String::with_capacity(hay.len());
    let mut i = 0;
    while let Some(pos) = hay[i..].find(needle) {
        let mut start = i + pos;
        let mut end = start + needle.len();
        let mut k = 0;
        while k < 3 && start > i && b64(bytes[start - 1]) {
            start -= 1;
            k += 1;
        }
        k = 0;
        while k < 4 && end < bytes.len() && b64(bytes[end]) {
            end += 1;
            k += 1;
        }
        out.push_str(&hay[i..start]);
        out.push_str(repl);
        i = end;
    }
    out.push_str(&hay[i..]);
    out
}

fn replace_ci(hay: &str, needle: &str, repl: &str) -> String {
    let lower = hay.to_ascii_lowercase();
    let n = needle.to_ascii_lowercase();
    let mut out = String::with_capacity(hay.len());
    let mut i = 0;
    while let Some(pos) = lower[i..].find(&n) {
        out.push_str(&hay[i..i + pos]);
        out.push_str(repl);
        i += pos + n.len();
    }
    out.push_str(&hay[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn scanner() -> (LeakScanner, String) {
        let s = LeakScanner::default();
        let secret = "crp-canary-0123456789abcdef0123456789abcdef".to_string();
        s.add("canary:x", &secret);
        (s, secret)
    }

    #[test]
    fn finds_every_encoding() {
        let (s, secret) = scanner();
        assert_eq!(s.find(&format!("{{\"k\":\"{secret}\"}}"))[0].encoding, "raw");
        assert!(!s.find(&hex::encode(&secret)).is_empty());
        assert!(!s.find(&hex::encode(&secret).to_uppercase()).is_empty());
        for prefix in ["", "u:", "ab:", "abc:"] {
            let b = STANDARD.encode(format!("{prefix}{secret}"));
            assert!(!s.find(&format!("Basic {b}")).is_empty(), "{prefix}");
            let b = URL_SAFE_NO_PAD.encode(format!("{prefix}{secret}"));
            assert!(!s.find(&b).is_empty(), "{prefix}");
        }
        let pct: String = secret.bytes().map(|b| format!("%{b:02x}")).collect();
        assert!(!s.find(&pct).is_empty());
        assert!(s.find("nothing to see").is_empty());
    }

    #[test]
    fn mask_removes_every_form() {
        let (s, secret) = scanner();
        let text = format!("{secret} {} {}", hex::encode(&secret), STANDARD.encode(format!("u:{secret}")));
        let masked = s.mask(&text);
        assert!(s.find(&masked).is_empty(), "{masked}");
        assert!(masked.contains("«canary:x»"));
        let basic = s.mask(&format!("Basic {} end", STANDARD.encode(format!("user:{secret}"))));
        // The username part may stay visible; nothing of the secret (nor its padding) does.
        assert!(basic.starts_with("Basic ") && basic.ends_with("» end") && s.find(&basic).is_empty(), "{basic}");
    }
}
