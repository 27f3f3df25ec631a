//! The MCP server: rmcp's [`ServerHandler`] over a [`Backend`].
//!
//! - `initialize` (MCP ≤ 2025-11-25) and `server/discover` (2026-07-28) both advertise
//!   `capabilities.experimental.crp` (and the same object under `capabilities.extensions`,
//!   key [`EXTENSION_ID`]) with the negotiated CRP version.
//! - The CRP version comes from the client's `experimental.crp.version` (initialize
//!   capabilities, or the per-request `_meta` client capabilities of 2026-07-28); absent means
//!   the newest; no common version is -33001 with `data.supported`.
//! - `crp/*` custom requests go through the backend unchanged (crp-core's dispatcher in
//!   embedded mode, the provider's in remote mode); CRP errors become JSON-RPC errors with the
//!   same code, message and data.
//! - `tools/list` and `tools/call` are [`crate::tools`]. An unknown tool is a JSON-RPC error
//!   (-32602); everything that goes wrong inside a tool is an `isError` result.

use std::sync::Arc;

use crp_core::types::Capability;
use crp_core::version::negotiate;
use crp_core::{CrpError, Version};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ClientCapabilities, CustomRequest, CustomResult, DiscoverResult,
    ErrorCode, ExperimentalCapabilities, ExtensionCapabilities, Implementation, InitializeRequestParams,
    InitializeResult, JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::Value;

use crate::backend::Backend;
use crate::tools::{self, CallEnv};

/// Key of the CRP capability under `capabilities.extensions` (SEP-1724 style id).
pub const EXTENSION_ID: &str = "io.github.crp-reference/crp";

/// The MCP server for one connection.
#[derive(Clone)]
pub struct CrpMcpServer {
    backend: Arc<dyn Backend>,
}

impl CrpMcpServer {
    /// Serve `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    fn capability_object(&self, version: Version) -> JsonObject {
        capability_json(&self.backend.capability(version))
    }

    fn config_for(&self, version: Version) -> ServerConfig {
        let cap = self.capability_object(version);
        let mut experimental = ExperimentalCapabilities::new();
        experimental.insert("crp".into(), cap.clone());
        let mut extensions = ExtensionCapabilities::new();
        extensions.insert(EXTENSION_ID.into(), cap);
        let caps = ServerCapabilities::builder()
            .enable_experimental_with(experimental)
            .enable_extensions_with(extensions)
            .enable_tools()
            .build();
        ServerConfig::new(caps)
            .with_server_info(Implementation::new("crp-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(instructions(self.backend.agent(), &self.backend.describe()))
    }

    /// The CRP version of the request in `cx`.
    fn version(&self, cx: &RequestContext<RoleServer>) -> Result<Version, CrpError> {
        negotiate_from(cx.client_capabilities().as_ref())
    }
}

/// `Capability` as a JSON object.
fn capability_json(c: &Capability) -> JsonObject {
    match serde_json::to_value(c) {
        Ok(Value::Object(o)) => o,
        _ => JsonObject::new(),
    }
}

/// Negotiate the CRP version from a client's capabilities (`experimental.crp.version`).
pub fn negotiate_from(caps: Option<&ClientCapabilities>) -> Result<Version, CrpError> {
    let requested = caps.and_then(|c| c.experimental.as_ref()).and_then(|e| e.get("crp")).and_then(|crp| crp.get("version"));
    match requested {
        None | Some(Value::Null) => negotiate(None),
        Some(Value::String(v)) => negotiate(Some(v)),
        // A number or object is not MAJOR.MINOR.
        Some(_) => negotiate(Some("?")),
    }
}

/// A CRP error as a JSON-RPC error with the same code, message and data.
pub fn to_mcp_error(e: CrpError) -> McpError {
    let code = i32::try_from(e.code).unwrap_or(-32603);
    let data = e.data.and_then(|d| serde_json::to_value(d).ok());
    McpError::new(ErrorCode(code), e.message, data)
}

fn instructions(agent: &str, where_: &str) -> String {
    format!(
        "crp-mcp: credentials through the Credential Resolution Protocol, acting as agent `{agent}` \
         ({where_}). Read-blind: no tool returns a stored value, except vault_retrieve and \
         credential_resolve with export=true, which need a `purpose` and a policy that permits the \
         export, and are audited. To call an API with a stored credential, use credential_use (or \
         credential_resolve): it returns a proxy_base_url and a session_token; send ordinary HTTP \
         requests to proxy_base_url + path with `Authorization: Bearer <session_token>` and the \
         provider adds the credential. Renew with credential_lease, give it back with \
         credential_lease action=release, cut it off with credential_revoke. vault_list shows what \
         exists (never values); policy_check explains what is allowed; audit_log shows what happened. \
         CRP clients can also send crp/use, crp/list, crp/lease and crp/revoke on this connection."
    )
}

impl ServerHandler for CrpMcpServer {
    fn get_info(&self) -> ServerConfig {
        self.config_for(Version::LATEST)
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        let version = negotiate_from(Some(&request.capabilities)).map_err(to_mcp_error)?;
        context.peer.set_peer_info(request.clone());
        let mut result = self.negotiate_initialize(&request)?;
        let cfg = self.config_for(version);
        result.capabilities = cfg.capabilities;
        tracing::info!(
            client = %request.client_info.name,
            mcp = %result.protocol_version,
            crp = %version,
            "initialized"
        );
        Ok(result)
    }

    async fn discover(&self, context: RequestContext<RoleServer>) -> Result<DiscoverResult, McpError> {
        let version = self.version(&context).map_err(to_mcp_error)?;
        Ok(DiscoverResult::from_server_info(self.supported_protocol_versions().into_owned(), self.config_for(version)))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(tools::tools().to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let version = self.version(&context).map_err(to_mcp_error)?;
        let env = CallEnv { version, client_name: context.client_info().map(|i| i.name) };
        let args = request.arguments.unwrap_or_default();
        let started = std::time::Instant::now();
        match tools::call_tool(&*self.backend, &env, &request.name, args).await {
            Some(result) => {
                tracing::info!(
                    tool = %request.name,
                    is_error = result.is_error.unwrap_or(false),
                    ms = started.elapsed().as_millis() as u64,
                    "tool call"
                );
                Ok(result.into())
            }
            None => Err(McpError::invalid_params(
                format!("unknown tool `{}`; tools/list names the tools", request.name.chars().take(64).collect::<String>()),
                None,
            )),
        }
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        let method = request.method.as_str();
        // crp/* and this provider's x-crp/* extensions go to the backend, where policy
        // decides per agent exactly as over HTTP.
        if !method.starts_with("crp/") && !method.starts_with(crp_core::methods::EXTENSION_PREFIX) {
            return Err(to_mcp_error(CrpError::method_not_found(method)));
        }
        let version = self.version(&context).map_err(to_mcp_error)?;
        let params = request.params.unwrap_or_else(|| Value::Object(Default::default()));
        let out = self.backend.call(version, method, params).await;
        tracing::info!(method, ok = out.is_ok(), "crp request");
        out.map(CustomResult::new).map_err(to_mcp_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(v: Value) -> ClientCapabilities {
        serde_json::from_value(serde_json::json!({"experimental": {"crp": v}})).unwrap()
    }

    #[test]
    fn version_from_client_capabilities() {
        assert_eq!(negotiate_from(None).unwrap(), Version::V0_2);
        assert_eq!(negotiate_from(Some(&ClientCapabilities::default())).unwrap(), Version::V0_2);
        assert_eq!(negotiate_from(Some(&caps(serde_json::json!({"version": "0.1"})))).unwrap(), Version::V0_1);
        assert_eq!(negotiate_from(Some(&caps(serde_json::json!({})))).unwrap(), Version::V0_2);
        let e = negotiate_from(Some(&caps(serde_json::json!({"version": "9.0"})))).unwrap_err();
        assert_eq!(e.code, -33001);
        let e = negotiate_from(Some(&caps(serde_json::json!({"version": 2})))).unwrap_err();
        assert_eq!(e.code, -33001);
        let m = to_mcp_error(e);
        assert_eq!(m.code.0, -33001);
        assert_eq!(m.data.unwrap()["supported"], serde_json::json!(["0.2", "0.1"]));
    }
}
