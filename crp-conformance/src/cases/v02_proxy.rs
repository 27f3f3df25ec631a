//! v0.2 §5.1, §9 and §10: the proxy at `proxyBaseUrl` injects the credential in transit, the
//! consumer's own token never reaches the upstream, no secret comes back, and a handle is
//! useless without a live lease.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crp_core::types::ext::InjectionRule;
use crp_core::fixtures::{FixtureCredential, FixtureRole};

use super::{bogus_lease_id, bx, is_refusal, proxy_refused};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::{Ctx, ProxyAuth, ProxyReq};
use crate::echo::Arrival;
use crate::{ensure, fail, skip};

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("proxy.injects-credential", Basic, "0.2", "§5.1", Must,
            "A request through proxyBaseUrl reaches the upstream with the credential injected", |c| bx(injects(c))),
        Case::new("proxy.injects-header-rule", Basic, "0.2", "§6.1", Should,
            "A custom header rule (X-Api-Key, no prefix) is applied exactly", |c| bx(header_rule(c))),
        Case::new("proxy.injects-query-rule", Basic, "0.2", "§6.1", Should,
            "A query-parameter rule is applied exactly", |c| bx(query_rule(c))),
        Case::new("proxy.injects-basic-rule", Basic, "0.2", "§6.1", Should,
            "basic_auth is sent as Authorization: Basic base64(username:password)", |c| bx(basic_rule(c))),
        Case::new("proxy.preserves-request", Basic, "0.2", "§9", Should,
            "Method, path, query and body reach the upstream unchanged", |c| bx(preserves(c))),
        Case::new("proxy.session-token-stripped", Basic, "0.2", "§10", Must,
            "The consumer's session token never reaches the upstream", |c| bx(token_stripped(c))),
        Case::new("proxy.requires-session-token", Basic, "0.2", "§10", Should,
            "Without the session token the proxy refuses and forwards nothing", |c| bx(requires_token(c))),
        Case::new("proxy.no-secret-in-response", Basic, "0.2", "§10", Must,
            "Proxied answers carry no credential material", |c| bx(no_secret_response(c))),
        Case::new("proxy.response-redaction", Basic, "0.2", "§10", Should,
            "A credential reflected by the upstream is redacted before it reaches the consumer", |c| bx(redaction(c))),
        Case::new("proxy.token-bound-to-lease", Basic, "0.2", "§10", Should,
            "One lease's session token does not open another lease's proxy URL", |c| bx(token_bound(c))),
        Case::new("proxy.unknown-lease", Basic, "0.2", "§10", Must,
            "A proxy URL naming no live lease is refused and forwards nothing", |c| bx(unknown_lease(c))),
    ]
}

/// Check that `a` carries `cred`'s value as its injection rule says.
pub fn check_injection(cred: &FixtureCredential, a: &Arrival) -> Result<(), Stop> {
    let v = cred.value.expose();
    match &cred.inject {
        InjectionRule::Header { name, prefix } => {
            let expected = if prefix.is_empty() { v.to_string() } else { format!("{prefix} {v}") };
            match a.header(name) {
                Some(got) if got == expected => Ok(()),
                Some(_) => Err(Stop::Fail(format!(
                    "the upstream got header `{name}` but not as `{}<{}>`",
                    if prefix.is_empty() { String::new() } else { format!("{prefix} ") },
                    cred.key
                ))),
                None => Err(Stop::Fail(format!("the upstream got no `{name}` header"))),
            }
        }
        InjectionRule::Query { name } => match a.query_param(name) {
            Some(got) if got == v => Ok(()),
            Some(_) => Err(Stop::Fail(format!("the upstream got query parameter `{name}` with another value"))),
            None => Err(Stop::Fail(format!("the upstream got no `{name}` query parameter"))),
        },
        InjectionRule::Basic => {
            let expected = format!("Basic {}", STANDARD.encode(v.as_bytes()));
            match a.header("authorization") {
                Some(got) if got == expected => Ok(()),
                Some(_) => Err(Stop::Fail("the upstream got an Authorization header that is not Basic base64(username:password)".into())),
                None => Err(Stop::Fail("the upstream got no Authorization header".into())),
            }
        }
    }
}

async fn injected(ctx: &Ctx, role: FixtureRole) -> CaseResult {
    let c = ctx.cred(role)?;
    let h = ctx.use_with(ctx.use_params(&c)).await?;
    let r = ctx.proxy(&h, ProxyReq::get("/probe")).await?;
    let Some(a) = &r.arrival else {
        fail!("the request through proxyBaseUrl never reached the upstream (proxy answered HTTP {})", r.status);
    };
    check_injection(&c, a)?;
    ensure!(r.status == 200, "the upstream answered 200, the proxy passed on HTTP {}", r.status);
    Ok(())
}

async fn injects(ctx: Ctx) -> CaseResult {
    injected(&ctx, FixtureRole::Primary).await
}

async fn header_rule(ctx: Ctx) -> CaseResult {
    injected(&ctx, FixtureRole::HeaderKey).await
}

async fn query_rule(ctx: Ctx) -> CaseResult {
    injected(&ctx, FixtureRole::Query).await
}

async fn basic_rule(ctx: Ctx) -> CaseResult {
    injected(&ctx, FixtureRole::Basic).await
}

async fn preserves(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let body = r#"{"hello":"upstream","n":[1,2,3]}"#;
    let req = ProxyReq {
        method: "POST",
        path: "/a/b%20c/d".into(),
        query: Some("x=1&y=two%20words".into()),
        body: Some(body.into()),
        auth: ProxyAuth::Session,
    };
    let r = ctx.proxy(&h, req).await?;
    let Some(a) = &r.arrival else { fail!("the request never reached the upstream (HTTP {})", r.status) };
    ensure!(a.method == "POST", "method arrived as {}", a.method);
    ensure!(a.path.ends_with("/a/b%20c/d"), "path arrived as `{}`, expected it to end with /a/b%20c/d", a.path);
    let q = a.query.clone().unwrap_or_default();
    ensure!(q.contains("x=1") && q.contains("y=two%20words"), "query arrived as `{q}`");
    ensure!(a.body == body.as_bytes(), "the body arrived changed ({} bytes)", a.body.len());
    Ok(())
}

async fn token_stripped(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let Some(tok) = h.token.clone() else {
        skip!("the provider issues no sessionToken; nothing to strip");
    };
    let r = ctx.proxy(&h, ProxyReq::get("/strip")).await?;
    let Some(a) = &r.arrival else { fail!("the request never reached the upstream (HTTP {})", r.status) };
    ensure!(!a.as_text().contains(&tok), "the upstream received the consumer's session token");
    Ok(())
}

async fn requires_token(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    if h.token.is_none() {
        skip!("the provider issues no sessionToken; the proxy URL itself is the bearer");
    }
    let req = ProxyReq { auth: ProxyAuth::None, ..ProxyReq::get("/no-token") };
    let r = ctx.proxy(&h, req).await?;
    proxy_refused(&r, "without the session token")
}

async fn no_secret_response(ctx: Ctx) -> CaseResult {
    for role in [FixtureRole::Primary, FixtureRole::HeaderKey, FixtureRole::Query, FixtureRole::Basic] {
        let c = ctx.cred(role)?;
        let h = ctx.use_with(ctx.use_params(&c)).await?;
        let r = ctx.proxy(&h, ProxyReq::get("/answer")).await?;
        ctx.no_leak(&format!("the proxied answer for {}", c.service), &r.as_text())?;
    }
    Ok(())
}

async fn redaction(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Reflect).await?;
    let r = ctx.proxy(&h, ProxyReq::get("/headers")).await?;
    if r.arrival.is_none() {
        fail!("the request never reached the reflecting upstream (HTTP {})", r.status);
    }
    ctx.no_leak("the answer relayed from an upstream that reflects request headers", &r.as_text())
}

async fn unknown_lease(ctx: Ctx) -> CaseResult {
    let mut h = ctx.use_role(FixtureRole::Primary).await?;
    if !h.url.contains(&h.lease_id) {
        skip!("proxyBaseUrl does not contain the lease id; cannot forge another");
    }
    let forged = bogus_lease_id(Some(&h.lease_id));
    h.url = h.url.replace(&h.lease_id, &forged);
    let r = ctx.proxy(&h, ProxyReq::get("/forged")).await?;
    proxy_refused(&r, "for a lease id that was never issued")?;
    ensure!(is_refusal(r.status), "HTTP {}", r.status);
    Ok(())
}

async fn token_bound(ctx: Ctx) -> CaseResult {
    let a = ctx.use_role(FixtureRole::Primary).await?;
    let b = ctx.use_role(FixtureRole::HeaderKey).await?;
    let (Some(_), Some(tb)) = (&a.token, &b.token) else {
        skip!("the provider issues no sessionToken");
    };
    // Lease A's URL with lease B's token.
    let mut crossed = a.clone();
    crossed.token = Some(tb.clone());
    let r = ctx.proxy(&crossed, ProxyReq::get("/crossed")).await?;
    proxy_refused(&r, "with another lease's session token")
}
