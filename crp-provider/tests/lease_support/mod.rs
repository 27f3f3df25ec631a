//! A lease request for tests that drive the audit writer's lease mutations directly
//! (`LeaseOp`s through `AuditLog::append_with`), without a vault in front.

use crp_provider::leases::{Caps, NewLease};

/// A 60-second lease `id` for agent `a` on credential `k` (service `svc`), scope `read`; the
/// token hash is the SHA-256 of the id.
pub fn new_lease(id: &str) -> NewLease {
    NewLease {
        id: id.to_string(),
        token_hash: crp_provider::crypto::sha256_hex(id.as_bytes()),
        credential_key: "k".into(),
        service: "svc".into(),
        agent: "a".into(),
        scopes: vec!["read".into()],
        ttl: 60,
        caps: Caps { provider_max_ttl: 3600, credential_max_ttl: None, max_lease_lifetime: 3600 },
        purpose: None,
        consumer: None,
    }
}
