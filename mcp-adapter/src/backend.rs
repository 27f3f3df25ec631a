//! One abstraction over where CRP calls go: [`Backend`].
//!
//! - [`Embedded`]: a [`crp_core::Dispatcher`] over an in-process provider (the local vault),
//!   called with `CallContext { agent, transport: Mcp, version }`.
//! - [`Remote`]: signed `POST {provider}/crp` as an installed agent.
//!
//! Every MCP tool and every `crp/*` request on the MCP connection becomes a
//! `call(version, method, params)` here, so both modes behave the same and policy always sees
//! the agent identity.

use std::sync::Arc;

use async_trait::async_trait;
use crp_core::provider::Transport;
use crp_core::types::{Capability, ConformanceTier, Feature};
use crp_core::{CallContext, CrpError, Dispatcher, Provider, Version};
use serde_json::Value;

use crate::remote::RemoteClient;

/// Where CRP calls go.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Call `method` (`crp/*` or `x-crp/*`) under `version`.
    async fn call(&self, version: Version, method: &str, params: Value) -> Result<Value, CrpError>;

    /// The capability to advertise to a client speaking `version`.
    fn capability(&self, version: Version) -> Capability;

    /// The agent id policies see.
    fn agent(&self) -> &str;

    /// One line for logs and the server instructions: where calls go.
    fn describe(&self) -> String;
}

/// An in-process provider behind crp-core's dispatcher.
pub struct Embedded {
    dispatcher: Dispatcher<dyn Provider>,
    agent: String,
    description: String,
}

impl Embedded {
    /// Serve `provider` as `agent`.
    pub fn new(provider: Arc<dyn Provider>, agent: impl Into<String>, description: impl Into<String>) -> Self {
        Self { dispatcher: Dispatcher::new(provider), agent: agent.into(), description: description.into() }
    }
}

#[async_trait]
impl Backend for Embedded {
    async fn call(&self, version: Version, method: &str, params: Value) -> Result<Value, CrpError> {
        let ctx = CallContext::new(self.agent.clone(), Transport::Mcp).with_version(version);
        self.dispatcher.call(&ctx, method, params).await
    }

    fn capability(&self, version: Version) -> Capability {
        self.dispatcher.provider().capability(version)
    }

    fn agent(&self) -> &str {
        &self.agent
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// A remote provider over signed HTTP.
pub struct Remote {
    client: RemoteClient,
    /// What `/.well-known/crp` said at startup, per version asked.
    capabilities: Vec<(Version, Capability)>,
}

impl Remote {
    /// Wrap a client; `capabilities` are the provider's discovery answers (per `CRP-Version`)
    /// that could be fetched.
    pub fn new(client: RemoteClient, capabilities: Vec<(Version, Capability)>) -> Self {
        Self { client, capabilities }
    }

    /// Ask the provider for its capability under every version we speak (concurrently).
    pub async fn discover(client: &RemoteClient) -> Vec<(Version, Capability)> {
        let (a, b) = tokio::join!(client.discover_version(Version::V0_2), client.discover_version(Version::V0_1));
        let mut out = Vec::new();
        for (v, r) in [(Version::V0_2, a), (Version::V0_1, b)] {
            match r {
                Ok(c) => out.push((v, c)),
                Err(e) => tracing::warn!("provider discovery for CRP {v} failed: {e:#}"),
            }
        }
        out
    }
}

#[async_trait]
impl Backend for Remote {
    async fn call(&self, version: Version, method: &str, params: Value) -> Result<Value, CrpError> {
        self.client.call(version, method, params).await
    }

    fn capability(&self, version: Version) -> Capability {
        let exact = self.capabilities.iter().find(|(v, _)| *v == version).map(|(_, c)| c);
        match exact.or_else(|| self.capabilities.first().map(|(_, c)| c)) {
            Some(c) => {
                let mut c = c.clone();
                c.version = version.to_string();
                // `resolve` exists only under 0.1 (interface.md): never advertise it under 0.2.
                if version != Version::V0_1 {
                    c.features.retain(|f| *f != Feature::Resolve);
                }
                c
            }
            // Unreachable at startup: advertise only what every CRP provider must implement.
            None => Capability {
                version: version.to_string(),
                versions: crp_core::version::SUPPORTED.iter().map(|s| s.to_string()).collect(),
                provider: None,
                features: vec![Feature::Use],
                conformance: Some(ConformanceTier::Basic),
            },
        }
    }

    fn agent(&self) -> &str {
        self.client.agent_id()
    }

    fn describe(&self) -> String {
        format!("remote provider {} as agent `{}`", self.client.base_url(), self.client.agent_id())
    }
}
