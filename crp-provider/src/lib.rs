//! # crp-provider
//!
//! The CRP reference provider as a library: an encrypted vault ([`vault::Vault`]) that
//! implements [`crp_core::Provider`] in-process, plus the pieces it is made of.
//!
//! Layering, lowest first:
//! - [`config`]: `CRP_HOME`, file layout, `config.toml`;
//! - [`crypto`]: the key hierarchy (Argon2id or keyfile KEK → random data key) and sealing;
//! - [`store`]: sqlx storage over SQLite (default) or PostgreSQL, embedded migrations;
//! - [`credentials`], [`leases`], [`audit`], [`agents`]: the records, each sealed or hashed
//!   where it holds anything sensitive;
//! - `policy` (Cedar) and `broker` (OAuth2 client credentials);
//! - [`proxy_lookup`]: the proxy's one-query read of a lease, its agent and its credential;
//! - `vault`: the facade the HTTP server, the MCP adapter and the CLI call.
//!
//! Credential values exist in clear only in memory, inside `SecretValue`, between the vault
//! and the proxy; they never reach the database, a log line, an error or the audit.

pub mod agents;
pub mod apply;
pub mod audit;
pub mod cli;
pub mod broker;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod crypto;
pub mod epoch;
pub mod http;
pub mod leases;
pub mod policy;
pub mod proxy_lookup;
pub mod store;
pub mod vault;
