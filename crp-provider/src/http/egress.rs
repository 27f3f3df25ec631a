//! Egress safety for the injecting proxy: where a credential may be sent.
//!
//! Owns the address policy: which hosts and addresses a credential may be sent to, and the
//! resolver that enforces it (the clients that use it are in [`super::upstream`]).
//! - The upstream is fixed by the credential (its base URL); the caller only appends a path
//!   and a query, and [`upstream_url`] checks the result stays on the same origin and under
//!   the base path.
//! - Redirects are never followed: a 3xx goes back to the caller.
//! - Names are resolved once per new connection by [`GuardedResolver`], the connector's
//!   resolver (a `tower` service of names), which refuses the whole answer when any address is private,
//!   loopback, link-local, CGNAT, unique-local, multicast, reserved or cloud metadata
//!   ([`is_blocked`]). The connection then goes to the address that was checked, so a later
//!   DNS answer cannot rebind it. Literal IP upstreams never reach a resolver; [`check_literal`]
//!   applies the same rule to them before a request is sent.
//! - The only exception is per credential: `ProxyGrant::allowed_private_hosts` names hosts
//!   (as written in the upstream URL, e.g. `127.0.0.1` or `localhost`) that one credential may
//!   reach although they are private. There is no global switch. Clients are cached per
//!   allowance set, so a pooled connection opened under one credential's allowance is never
//!   reused for a credential without it.
//! - No system proxy is used: the environment's `HTTP_PROXY` and friends are never read.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use reqwest::Url;

/// Cloud metadata endpoints, refused like every link-local/unique-local address.
pub const METADATA_ADDRESSES: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
];

/// The proxy refused to send a request to this destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressDenied {
    /// Host as the upstream URL names it.
    pub host: String,
    /// Why (never a secret: an address class, not the request).
    pub reason: String,
}

impl std::fmt::Display for EgressDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "egress to {} refused: {}", self.host, self.reason)
    }
}

impl std::error::Error for EgressDenied {}

/// Why an IPv4 address is not a public destination, or `None` when it is.
fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        return Some("cloud metadata address");
    }
    Some(match o {
        [0, ..] => "unspecified/\"this network\" address",
        [10, ..] => "private address (10.0.0.0/8)",
        [100, b, ..] if (64..128).contains(&b) => "carrier-grade NAT address (100.64.0.0/10)",
        [127, ..] => "loopback address",
        [169, 254, ..] => "link-local address",
        [172, b, ..] if (16..32).contains(&b) => "private address (172.16.0.0/12)",
        [192, 168, ..] => "private address (192.168.0.0/16)",
        [192, 0, 0, _] => "IETF protocol assignment (192.0.0.0/24)",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation address",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking address (198.18.0.0/15)",
        [a, ..] if a >= 224 => "multicast or reserved address",
        _ => return None,
    })
}

/// Why an IPv6 address is not a public destination, or `None` when it is.
fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        return Some("cloud metadata address");
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified address");
    }
    if ip.is_loopback() {
        return Some("loopback address");
    }
    // Addresses that embed an IPv4 address: judge the embedded one.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4);
    }
    if s[0..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible (deprecated) ::a.b.c.d
        return blocked_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
            .or(Some("IPv4-compatible address"));
    }
    if s[0] == 0x0064 && s[1] == 0xff9b {
        // NAT64 64:ff9b::/96 and the local-use 64:ff9b:1::/48
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return blocked_v4(v4).or(if s[2] == 1 { Some("local-use NAT64 address") } else { None });
    }
    if s[0] == 0x2002 {
        // 6to4: 2002:aabb:ccdd::/48 embeds aa.bb.cc.dd
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return blocked_v4(v4);
    }
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "unique-local address (fc00::/7)",
        x if x & 0xffc0 == 0xfe80 => "link-local address",
        x if x & 0xffc0 == 0xfec0 => "site-local address",
        x if x & 0xff00 == 0xff00 => "multicast address",
        0x2001 if s[1] == 0x0db8 => "documentation address",
        0x0100 if s[1..4] == [0, 0, 0] => "discard-only address",
        _ => return None,
    })
}

/// Why `ip` may not be an upstream without an explicit allowance; `None` for public addresses.
///
/// ```
/// use crp_provider::http::egress::is_blocked;
/// assert!(is_blocked("169.254.169.254".parse().unwrap()).is_some());
/// assert!(is_blocked("fd00:ec2::254".parse().unwrap()).is_some());
/// assert!(is_blocked("10.1.2.3".parse().unwrap()).is_some());
/// assert!(is_blocked("::ffff:127.0.0.1".parse().unwrap()).is_some());
/// assert!(is_blocked("140.82.112.3".parse().unwrap()).is_none());
/// ```
pub fn is_blocked(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

/// Normalise a host for comparison with an allowance entry: lowercase, no brackets, no
/// trailing dot.
fn norm_host(h: &str) -> String {
    h.trim().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

/// A per-credential allowance: hosts that may be private.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Allowance(BTreeSet<String>);

impl Allowance {
    /// From `ProxyGrant::allowed_private_hosts`.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(hosts: I) -> Self {
        Self(hosts.into_iter().map(|h| norm_host(h.as_ref())).filter(|h| !h.is_empty()).collect())
    }

    /// Whether `host` (a name or a literal address) is explicitly allowed.
    pub fn allows(&self, host: &str) -> bool {
        let h = norm_host(host);
        if self.0.contains(&h) {
            return true;
        }
        // Literal addresses compare as addresses (`::1` == `0:0:0:0:0:0:0:1`).
        match h.parse::<IpAddr>() {
            Ok(ip) => self.0.iter().any(|a| a.parse::<IpAddr>().is_ok_and(|b| b == ip)),
            Err(_) => false,
        }
    }
}

/// Check a literal-IP upstream host (these never reach the resolver). Hosts that are names
/// pass here and are checked by [`GuardedResolver`] when a connection is opened. The URL
/// parser has already normalised odd IPv4 spellings (`0x7f.1`, `2130706433`) to dotted form.
pub fn check_literal(url: &Url, allowance: &Allowance) -> Result<(), EgressDenied> {
    let Some(shown) = url.host_str() else {
        return Err(EgressDenied { host: String::new(), reason: "no host".into() });
    };
    let Ok(ip) = norm_host(shown).parse::<IpAddr>() else {
        return Ok(());
    };
    match is_blocked(ip) {
        Some(reason) if !allowance.allows(shown) => Err(EgressDenied { host: shown.into(), reason: reason.into() }),
        _ => Ok(()),
    }
}

/// Resolves names with the system resolver, then refuses an answer that contains any
/// address [`is_blocked`] rejects, unless the name is in the allowance.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allowance: Arc<Allowance>,
}

impl GuardedResolver {
    /// A resolver for one allowance set.
    pub fn new(allowance: Allowance) -> Self {
        Self { allowance: Arc::new(allowance) }
    }

    /// Resolve and check (what the connector's calls come to).
    pub async fn lookup(allowance: &Allowance, name: &str) -> Result<Vec<SocketAddr>, EgressDenied> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, 0))
            .await
            .map_err(|_| EgressDenied { host: name.into(), reason: "name does not resolve".into() })?
            .collect();
        if addrs.is_empty() {
            return Err(EgressDenied { host: name.into(), reason: "name does not resolve".into() });
        }
        if !allowance.allows(name) {
            for a in &addrs {
                if let Some(reason) = is_blocked(a.ip()) {
                    return Err(EgressDenied { host: name.into(), reason: format!("resolves to a {reason}") });
                }
            }
        }
        Ok(addrs)
    }
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = EgressDenied;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, EgressDenied>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), EgressDenied>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allowance = self.allowance.clone();
        Box::pin(async move { Ok(Self::lookup(&allowance, name.as_str()).await?.into_iter()) })
    }
}

/// Find an [`EgressDenied`] in an error's source chain.
pub fn egress_denied_in(err: &(dyn std::error::Error + 'static)) -> Option<EgressDenied> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<EgressDenied>() {
            return Some(d.clone());
        }
        cur = e.source();
    }
    None
}

/// The upstream URL for `rest` (already percent-encoded, without leading `/`) and `query`
/// (raw, without `?`) under `base`. Refused when the result leaves the base's origin or path.
///
/// ```
/// use crp_provider::http::egress::upstream_url;
/// let u = upstream_url("https://api.example.com/v1", "repos/x", Some("a=1")).unwrap();
/// assert_eq!(u.as_str(), "https://api.example.com/v1/repos/x?a=1");
/// assert!(upstream_url("https://api.example.com/v1", "../admin", None).is_err());
/// assert!(upstream_url("https://api.example.com/v1", "%2e%2e/admin", None).is_err());
/// ```
pub fn upstream_url(base: &str, rest: &str, query: Option<&str>) -> Result<Url, String> {
    let base_url = Url::parse(base).map_err(|_| "the credential's upstream is not a valid URL".to_string())?;
    if !matches!(base_url.scheme(), "http" | "https") {
        return Err("the credential's upstream must be http or https".into());
    }
    if base_url.host().is_none() {
        return Err("the credential's upstream has no host".into());
    }
    let base_path = base_url.path().trim_end_matches('/').to_string();
    let mut s = String::with_capacity(base.len() + rest.len() + 2);
    s.push_str(base_url.scheme());
    s.push_str("://");
    s.push_str(base_url.host_str().unwrap_or_default());
    if let Some(p) = base_url.port() {
        s.push(':');
        s.push_str(&p.to_string());
    }
    s.push_str(&base_path);
    s.push('/');
    s.push_str(rest);
    let mut url = Url::parse(&s).map_err(|_| "the request path is not valid".to_string())?;
    if url.scheme() != base_url.scheme()
        || url.host_str() != base_url.host_str()
        || url.port_or_known_default() != base_url.port_or_known_default()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err("the request path leaves the credential's upstream".into());
    }
    let p = url.path();
    if !(p == base_path || p.starts_with(&format!("{base_path}/")) || base_path.is_empty()) {
        return Err("the request path leaves the credential's upstream base path".into());
    }
    // Base query (if any) first, then the caller's.
    let q = match (base_url.query(), query) {
        (Some(b), Some(c)) if !c.is_empty() => Some(format!("{b}&{c}")),
        (Some(b), _) => Some(b.to_string()),
        (None, Some(c)) if !c.is_empty() => Some(c.to_string()),
        _ => None,
    };
    url.set_query(q.as_deref());
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_the_classes() {
        for a in [
            "127.0.0.1", "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "169.254.169.254",
            "169.254.1.1", "100.64.0.1", "100.127.255.255", "0.0.0.0", "224.0.0.1", "255.255.255.255",
            "::1", "::", "fd00:ec2::254", "fc00::1", "fe80::1", "ff02::1", "::ffff:10.0.0.1",
            "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:7f00:1::", "::127.0.0.1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(is_blocked(ip).is_some(), "{a} should be blocked");
        }
        for a in ["8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "64:ff9b::808:808"] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(is_blocked(ip).is_none(), "{a} should be allowed");
        }
    }

    #[test]
    fn allowance_matches_names_and_addresses() {
        let a = Allowance::new(["127.0.0.1", "LocalHost", "[::1]"]);
        assert!(a.allows("127.0.0.1"));
        assert!(a.allows("localhost"));
        assert!(a.allows("localhost."));
        assert!(a.allows("[::1]"));
        assert!(a.allows("0:0:0:0:0:0:0:1"));
        assert!(!a.allows("127.0.0.2"));
        assert!(!Allowance::default().allows("127.0.0.1"));
    }

    #[test]
    fn literal_checks() {
        let h = |s: &str| Url::parse(s).unwrap();
        let none = Allowance::default();
        assert!(check_literal(&h("http://169.254.169.254/"), &none).is_err());
        assert!(check_literal(&h("http://[fd00:ec2::254]/"), &none).is_err());
        assert!(check_literal(&h("http://127.0.0.1:9/"), &none).is_err());
        assert!(check_literal(&h("http://127.0.0.1:9/"), &Allowance::new(["127.0.0.1"])).is_ok());
        assert!(check_literal(&h("http://8.8.8.8/"), &none).is_ok());
        assert!(check_literal(&h("http://example.com/"), &none).is_ok());
        assert!(check_literal(&h("http://0x7f.1/"), &none).is_err());
        assert!(check_literal(&h("http://2130706433/"), &none).is_err());
    }

    #[tokio::test]
    async fn resolver_refuses_loopback_names_unless_allowed() {
        let e = GuardedResolver::lookup(&Allowance::default(), "localhost").await.unwrap_err();
        assert!(e.reason.contains("loopback"), "{e}");
        let ok = GuardedResolver::lookup(&Allowance::new(["localhost"]), "localhost").await.unwrap();
        assert!(ok.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn urls_stay_under_the_base() {
        let u = upstream_url("http://127.0.0.1:9000/base/", "a/b", Some("x=1&y=2")).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:9000/base/a/b?x=1&y=2");
        let u = upstream_url("http://h/", "", None).unwrap();
        assert_eq!(u.as_str(), "http://h/");
        let u = upstream_url("http://h/base?k=v", "x", Some("a=1")).unwrap();
        assert_eq!(u.as_str(), "http://h/base/x?k=v&a=1");
        assert!(upstream_url("http://h/base", "../etc", None).is_err());
        assert!(upstream_url("http://h/base", "x/../../etc", None).is_err());
        assert!(upstream_url("http://h/base", "%2E%2E/etc", None).is_err());
        // "@" or "//" in the path cannot change the authority: the base's authority is fixed.
        let u = upstream_url("http://h/base", "@evil.com/x", None).unwrap();
        assert_eq!(u.host_str(), Some("h"));
        let u = upstream_url("http://h/base", "/evil.com/x", None).unwrap();
        assert_eq!(u.host_str(), Some("h"));
        assert!(upstream_url("file:///etc/passwd", "", None).is_err());
        assert!(upstream_url("not a url", "", None).is_err());
    }
}
