//! A toy CRP provider on the spec's stdio transport: newline-delimited JSON-RPC 2.0 on
//! stdin/stdout, one message (or batch) per line. It knows one service and hands out leases
//! whose proxy URL points nowhere; it exists to show how little a transport has to do around
//! `crp_core::Dispatcher`.
//!
//! ```sh
//! echo '{"jsonrpc":"2.0","id":1,"method":"crp/use","params":{"service":"github.com/api"}}' \
//!   | cargo run -q -p crp-core --example stdio-provider
//! ```
//!
//! Set `CRP_VERSION=0.1` to speak 0.1 (the negotiation a real transport does per connection).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use crp_core::provider::Transport;
use crp_core::types::*;
use crp_core::{CallContext, CrpError, Dispatcher, Provider, Version};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SERVICE: &str = "github.com/api";

/// Leases live in memory: lease id -> service.
#[derive(Default)]
struct Toy {
    next: AtomicU64,
    leases: Mutex<BTreeMap<String, String>>,
}

impl Toy {
    fn lease(&self, id: &str, ttl: u32) -> Lease {
        Lease { id: id.into(), expires_at: "2099-01-01T00:00:00Z".into(), ttl, renewable: true, delegation_depth: Some(0) }
    }
}

#[async_trait]
impl Provider for Toy {
    fn capability(&self, version: Version) -> Capability {
        Capability {
            version: version.to_string(),
            versions: crp_core::version::SUPPORTED.iter().map(|s| s.to_string()).collect(),
            provider: Some("toy-stdio".into()),
            features: vec![Feature::Use, Feature::Lease, Feature::List],
            conformance: Some(ConformanceTier::Basic),
        }
    }

    async fn use_credential(&self, _: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
        if p.service != SERVICE {
            return Err(CrpError::service_not_found(&p.service));
        }
        // A toy id; a real provider draws >= 128 bits from a CSPRNG (v0.1 §11.2).
        let id = format!("lease-toy-{}", self.next.fetch_add(1, Ordering::Relaxed));
        self.leases.lock().map_err(|_| CrpError::internal())?.insert(id.clone(), p.service.clone());
        Ok(UseResult {
            lease: self.lease(&id, p.ttl.unwrap_or(900).min(3600)),
            proxy_base_url: format!("http://127.0.0.1:7700/api/v1/proxy/t/{id}"),
            session_token: None,
            service: p.service,
            granted_scopes: p.scopes,
            credential_descriptor: CredentialDescriptor {
                credential_type: CredentialType::OauthBearer,
                brokered: false,
                auto_refresh: false,
                classification: Classification::Confidential,
            },
        })
    }

    async fn lease(&self, _: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        let mut leases = self.leases.lock().map_err(|_| CrpError::internal())?;
        if !leases.contains_key(&p.lease_id) {
            return Err(CrpError::lease_not_found(&p.lease_id));
        }
        Ok(match p.action {
            LeaseAction::Renew => LeaseResult::Renewed(LeaseRenewed {
                lease: self.lease(&p.lease_id, p.ttl.unwrap_or(900).min(3600)),
                proxy_base_url: Some(format!("http://127.0.0.1:7700/api/v1/proxy/t/{}", p.lease_id)),
                credential: None,
            }),
            LeaseAction::Release => {
                leases.remove(&p.lease_id);
                LeaseResult::Released(LeaseReleased { released: true, lease_id: p.lease_id })
            }
        })
    }

    async fn list(&self, _: &CallContext, _: ListParams) -> Result<ListResult, CrpError> {
        Ok(ListResult {
            services: vec![ServiceEntry {
                service: SERVICE.into(),
                credential_types: vec![CredentialType::OauthBearer],
                available_scopes: Some(vec!["repo:read".into()]),
                max_ttl: Some(3600),
                description: Some("toy".into()),
                classification: Some(Classification::Confidential),
            }],
            cursor: None,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let version = match crp_core::version::negotiate(std::env::var("CRP_VERSION").ok().as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let ctx = CallContext::new("owner", Transport::Stdio).with_version(version);
    let dispatcher = Dispatcher::new(Arc::new(Toy::default()));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(answer) = dispatcher.handle_bytes(&ctx, line.as_bytes()).await {
            out.write_all(answer.as_bytes()).await?;
            out.write_all(b"\n").await?;
            out.flush().await?;
        }
    }
    Ok(())
}
