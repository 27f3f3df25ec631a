//! # mcp-adapter (`crp-mcp`)
//!
//! The MCP server AI clients launch. It speaks MCP over stdio (rmcp), offers the vault as
//! tools (read-blind by default), advertises `experimental.crp` and answers `crp/*` requests on
//! the same connection. Everything goes through one [`backend::Backend`]:
//!
//! - embedded: the local vault in-process, through crp-core's dispatcher, as the local owner's
//!   agent (or the one configured), with the injecting proxy served on the configured address;
//! - remote: a provider over HTTP, every request signed as an installed agent.
//!
//! Modules:
//! - [`backend`]: the `Backend` trait, `Embedded` and `Remote`;
//! - [`server`]: the rmcp `ServerHandler` (initialize / discover / tools / custom requests);
//! - [`tools`]: tool definitions, argument and result types, error guidance;
//! - [`remote`]: signed HTTP client, discovery, bootstrap registration;
//! - [`embedded`]: opening the local vault and serving (or finding) the proxy;
//! - [`identity`]: local agent identities (`install`, `whoami`, `revoke`);
//! - [`client_config`]: `config <client>` blocks;
//! - [`stdio`]: the stdio relay that answers non-JSON lines with -32700.

// `CrpError` (crp-core) is the protocol's error type and is returned as is on purpose.
#![allow(clippy::result_large_err)]

pub mod backend;
pub mod client_config;
pub mod embedded;
pub mod identity;
pub mod remote;
pub mod server;
pub mod stdio;
pub mod tools;
