//! Credential records: what is stored about a credential, its versions, and how each version's
//! value and sensitive configuration are sealed.
//!
//! A credential is a row in `credentials` (non-secret attributes policies and listings need:
//! key, service, kind, classification, tags, allowed scopes, max TTL, free-form metadata,
//! expiry, current version) plus one row per version in `credential_versions` holding two
//! sealed blobs: the value, and the [`CredentialConfig`] (upstream URL, injection rule, allowed
//! private hosts, broker settings). Both are sealed with AAD binding them to key and version,
//! so a blob copied to another key or version fails to open. Overwriting keeps old versions.
//!
//! Never returns a value except through [`open_current`], whose callers are the proxy grant,
//! the audited exports, and the broker.

use std::collections::BTreeMap;

use crp_core::SecretValue;
use crp_core::types::ext::InjectionRule;
use crp_core::types::{Classification, CredentialType};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{Key32, aad};
use crate::store::{Store, StoreError, now_ms, with_pool, with_write_tx};

/// Kind of credential: the CRP types plus the brokered `oauth2_client_credentials`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// API key.
    ApiKey,
    /// OAuth bearer token.
    OauthBearer,
    /// Username and password (`username:password`).
    BasicAuth,
    /// Client certificate.
    ClientCertificate,
    /// Connection string.
    ConnectionString,
    /// Anything else.
    Custom,
    /// OAuth2 client credentials: the value is the client secret; access tokens are minted by
    /// the provider (brokered) and never leave it.
    Oauth2ClientCredentials,
}

impl CredentialKind {
    /// Every kind.
    pub const ALL: [CredentialKind; 7] = [
        Self::ApiKey,
        Self::OauthBearer,
        Self::BasicAuth,
        Self::ClientCertificate,
        Self::ConnectionString,
        Self::Custom,
        Self::Oauth2ClientCredentials,
    ];

    /// Wire / storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::OauthBearer => "oauth_bearer",
            Self::BasicAuth => "basic_auth",
            Self::ClientCertificate => "client_certificate",
            Self::ConnectionString => "connection_string",
            Self::Custom => "custom",
            Self::Oauth2ClientCredentials => "oauth2_client_credentials",
        }
    }

    /// The CRP type a caller sees (a brokered credential yields bearer tokens).
    pub fn crp_type(self) -> CredentialType {
        match self {
            Self::ApiKey => CredentialType::ApiKey,
            Self::OauthBearer | Self::Oauth2ClientCredentials => CredentialType::OauthBearer,
            Self::BasicAuth => CredentialType::BasicAuth,
            Self::ClientCertificate => CredentialType::ClientCertificate,
            Self::ConnectionString => CredentialType::ConnectionString,
            Self::Custom => CredentialType::Custom,
        }
    }

    /// Whether access tokens are minted by the provider.
    pub fn brokered(self) -> bool {
        matches!(self, Self::Oauth2ClientCredentials)
    }

    /// The default injection rule for this kind.
    pub fn default_injection(self) -> InjectionRule {
        match self {
            Self::BasicAuth => InjectionRule::Basic,
            _ => InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() },
        }
    }
}

impl From<CredentialType> for CredentialKind {
    fn from(t: CredentialType) -> Self {
        match t {
            CredentialType::ApiKey => Self::ApiKey,
            CredentialType::OauthBearer => Self::OauthBearer,
            CredentialType::BasicAuth => Self::BasicAuth,
            CredentialType::ClientCertificate => Self::ClientCertificate,
            CredentialType::ConnectionString => Self::ConnectionString,
            CredentialType::Custom => Self::Custom,
        }
    }
}

impl std::str::FromStr for CredentialKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            format!(
                "unknown credential type `{s}` (expected one of: {})",
                Self::ALL.map(|k| k.as_str()).join(", ")
            )
        })
    }
}

/// Parse the CLI/TOML short form of an injection rule: `header:NAME[:PREFIX]`, `query:NAME`
/// or `basic`.
///
/// ```
/// use crp_provider::credentials::parse_injection;
/// use crp_core::types::ext::InjectionRule;
/// assert_eq!(parse_injection("header:Authorization:Bearer").unwrap(),
///            InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() });
/// assert_eq!(parse_injection("query:api_key").unwrap(), InjectionRule::Query { name: "api_key".into() });
/// assert!(parse_injection("cookie:x").is_err());
/// ```
pub fn parse_injection(s: &str) -> Result<InjectionRule, String> {
    let token = |n: &str| !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let mut parts = s.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("basic"), None, None) => Ok(InjectionRule::Basic),
        (Some("header"), Some(name), prefix) if token(name) => {
            let prefix = prefix.unwrap_or("").trim().to_string();
            if prefix.len() > 64 || prefix.bytes().any(|b| b.is_ascii_control()) {
                return Err("injection prefix must be at most 64 printable characters".into());
            }
            Ok(InjectionRule::Header { name: name.into(), prefix })
        }
        (Some("query"), Some(name), None) if token(name) => Ok(InjectionRule::Query { name: name.into() }),
        _ => Err(format!(
            "bad injection rule `{s}`: expected header:NAME[:PREFIX] (e.g. header:Authorization:Bearer), query:NAME, or basic"
        )),
    }
}

/// OAuth2 client-credentials settings (sealed; the client secret is the credential value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerConfig {
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Scopes to request.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The sensitive, non-value configuration of a credential version. Sealed at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialConfig {
    /// Upstream base URL the proxy forwards to.
    #[serde(default)]
    pub upstream: Option<String>,
    /// How the proxy injects the value.
    pub injection: InjectionRule,
    /// Private hosts the egress guard may reach for this credential (e.g. `127.0.0.1`).
    #[serde(default)]
    pub allowed_private_hosts: Vec<String>,
    /// Broker settings for `oauth2_client_credentials`.
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
}

/// A credential to store (or overwrite with a new version).
#[derive(Debug, Clone)]
pub struct NewCredential {
    /// Vault key.
    pub key: String,
    /// CRP service id.
    pub service: String,
    /// Kind.
    pub kind: CredentialKind,
    /// Classification.
    pub classification: Classification,
    /// Tags.
    pub tags: Vec<String>,
    /// Scopes a lease may be granted (empty: no scopes offered).
    pub scopes: Vec<String>,
    /// Longest lease TTL for this credential.
    pub max_ttl: Option<u32>,
    /// Whether leases on it may be renewed.
    pub renewable: bool,
    /// Free-form, non-secret metadata.
    pub metadata: BTreeMap<String, String>,
    /// Expiry of the stored credential (unix ms).
    pub expires_at: Option<i64>,
    /// The value (for `oauth2_client_credentials`: the client secret).
    pub value: SecretValue,
    /// Sealed configuration.
    pub config: CredentialConfig,
}

/// The non-secret attributes of a stored credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialRecord {
    /// Vault key.
    pub key: String,
    /// Service id.
    pub service: String,
    /// Kind.
    pub kind: CredentialKind,
    /// Classification.
    pub classification: Classification,
    /// Tags.
    pub tags: Vec<String>,
    /// Allowed scopes.
    pub scopes: Vec<String>,
    /// Max lease TTL.
    pub max_ttl: Option<u32>,
    /// Whether leases on it may be renewed.
    pub renewable: bool,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Expiry (unix ms).
    pub expires_at: Option<i64>,
    /// Current version.
    pub version: i64,
    /// Created (unix ms).
    pub created_at: i64,
    /// Last overwritten (unix ms).
    pub updated_at: i64,
}

impl CredentialRecord {
    /// Whether the stored credential has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|e| e <= now_ms)
    }
}

type Row = (String, String, String, String, String, String, Option<i64>, i64, String, Option<i64>, i64, i64, i64);

fn from_row(r: Row) -> Result<CredentialRecord, StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("credential `{}`: bad {what}", r.0));
    Ok(CredentialRecord {
        kind: r.2.parse().map_err(|_| bad("kind"))?,
        classification: r.3.parse().map_err(|_| bad("classification"))?,
        tags: serde_json::from_str(&r.4).map_err(|_| bad("tags"))?,
        scopes: serde_json::from_str(&r.5).map_err(|_| bad("scopes"))?,
        max_ttl: r.6.map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
        renewable: r.7 != 0,
        metadata: serde_json::from_str(&r.8).map_err(|_| bad("metadata"))?,
        expires_at: r.9,
        version: r.10,
        created_at: r.11,
        updated_at: r.12,
        key: r.0,
        service: r.1,
    })
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Store a credential; overwriting keeps the previous versions. Returns the new version.
pub async fn put(store: &Store, dk: &Key32, c: &NewCredential) -> Result<i64, StoreError> {
    let config = Zeroizing::new(serde_json::to_vec(&c.config).map_err(|e| StoreError::Corrupt(e.to_string()))?);
    let now = now_ms();
    let version: i64 = with_write_tx!(store, |tx| {
        let cur: Option<i64> = sqlx::query_scalar("SELECT version FROM credentials WHERE key = $1")
            .bind(&c.key)
            .fetch_optional(&mut *tx)
            .await?;
        let max_v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM credential_versions WHERE key = $1")
            .bind(&c.key)
            .fetch_one(&mut *tx)
            .await?;
        let v = cur.unwrap_or(0).max(max_v.unwrap_or(0)) + 1;
        let sealed_value = dk
            .seal(&aad("cred-value", &c.key, v), c.value.expose().as_bytes())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sealed_config =
            dk.seal(&aad("cred-config", &c.key, v), &config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO credential_versions (key, version, sealed_value, sealed_config, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&c.key)
        .bind(v)
        .bind(sealed_value)
        .bind(sealed_config)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO credentials (key, service, kind, classification, tags, scopes, max_ttl, renewable, metadata, expires_at, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $12, $8, $9, $10, $11, $11)
             ON CONFLICT (key) DO UPDATE SET service = excluded.service, kind = excluded.kind,
               classification = excluded.classification, tags = excluded.tags, scopes = excluded.scopes,
               max_ttl = excluded.max_ttl, renewable = excluded.renewable, metadata = excluded.metadata, expires_at = excluded.expires_at,
               version = excluded.version, updated_at = excluded.updated_at",
        )
        .bind(&c.key)
        .bind(&c.service)
        .bind(c.kind.as_str())
        .bind(c.classification.as_str())
        .bind(json(&c.tags))
        .bind(json(&c.scopes))
        .bind(c.max_ttl.map(i64::from))
        .bind(json(&c.metadata))
        .bind(c.expires_at)
        .bind(v)
        .bind(now)
        .bind(i64::from(c.renewable))
        .execute(&mut *tx)
        .await?;
        v
    });
    Ok(version)
}

/// One credential's attributes.
pub async fn get(store: &Store, key: &str) -> Result<Option<CredentialRecord>, StoreError> {
    const Q: &str = "SELECT key, service, kind, classification, tags, scopes, max_ttl, renewable, metadata, expires_at, version, created_at, updated_at FROM credentials WHERE key = $1";
    let row: Option<Row> = with_pool!(store, |p| sqlx::query_as(Q).bind(key).fetch_optional(p).await?);
    row.map(from_row).transpose()
}

/// Every credential offering `service`, by key.
pub async fn by_service(store: &Store, service: &str) -> Result<Vec<CredentialRecord>, StoreError> {
    const Q: &str = "SELECT key, service, kind, classification, tags, scopes, max_ttl, renewable, metadata, expires_at, version, created_at, updated_at FROM credentials WHERE service = $1 ORDER BY key";
    let rows: Vec<Row> = with_pool!(store, |p| sqlx::query_as(Q).bind(service).fetch_all(p).await?);
    rows.into_iter().map(from_row).collect()
}

/// Credentials whose key is greater than `after`, by key (all when `after` is empty).
pub async fn list(store: &Store, after: &str) -> Result<Vec<CredentialRecord>, StoreError> {
    const Q: &str = "SELECT key, service, kind, classification, tags, scopes, max_ttl, renewable, metadata, expires_at, version, created_at, updated_at FROM credentials WHERE key > $1 ORDER BY key";
    let rows: Vec<Row> = with_pool!(store, |p| sqlx::query_as(Q).bind(after).fetch_all(p).await?);
    rows.into_iter().map(from_row).collect()
}

/// Number of stored versions of `key`.
pub async fn version_count(store: &Store, key: &str) -> Result<i64, StoreError> {
    const Q: &str = "SELECT COUNT(*) FROM credential_versions WHERE key = $1";
    Ok(with_pool!(store, |p| sqlx::query_scalar(Q).bind(key).fetch_one(p).await?))
}

/// Open the current version's value and configuration.
pub async fn open_current(
    store: &Store,
    dk: &Key32,
    key: &str,
) -> Result<Option<(CredentialRecord, SecretValue, CredentialConfig)>, StoreError> {
    let Some(rec) = get(store, key).await? else { return Ok(None) };
    const Q: &str = "SELECT sealed_value, sealed_config FROM credential_versions WHERE key = $1 AND version = $2";
    let row: Option<(Vec<u8>, Vec<u8>)> =
        with_pool!(store, |p| sqlx::query_as(Q).bind(key).bind(rec.version).fetch_optional(p).await?);
    let Some((sv, sc)) = row else {
        return Err(StoreError::Corrupt(format!("credential `{key}`: current version missing")));
    };
    let (value, config) = unseal(dk, key, rec.version, &sv, &sc)?;
    Ok(Some((rec, value, config)))
}

/// Open the sealed value and configuration of version `version` of `key`.
pub(crate) fn unseal(
    dk: &Key32,
    key: &str,
    version: i64,
    sealed_value: &[u8],
    sealed_config: &[u8],
) -> Result<(SecretValue, CredentialConfig), StoreError> {
    let value = dk
        .open(&aad("cred-value", key, version), sealed_value)
        .map_err(|e| StoreError::Corrupt(format!("credential `{key}`: {e}")))?;
    let value = SecretValue::new(
        String::from_utf8(value.to_vec()).map_err(|_| StoreError::Corrupt(format!("credential `{key}`: value not UTF-8")))?,
    );
    let config = dk
        .open(&aad("cred-config", key, version), sealed_config)
        .map_err(|e| StoreError::Corrupt(format!("credential `{key}`: {e}")))?;
    let config: CredentialConfig =
        serde_json::from_slice(&config).map_err(|_| StoreError::Corrupt(format!("credential `{key}`: bad config")))?;
    Ok((value, config))
}

/// Delete a credential and all its versions. Returns whether it existed.
pub async fn delete(store: &Store, key: &str) -> Result<bool, StoreError> {
    let n = with_write_tx!(store, |tx| {
        sqlx::query("DELETE FROM credential_versions WHERE key = $1").bind(key).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM credentials WHERE key = $1").bind(key).execute(&mut *tx).await?.rows_affected()
    });
    Ok(n > 0)
}
