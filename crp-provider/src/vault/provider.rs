//! `impl crp_core::Provider for Vault`: capabilities, and the dispatch of each CRP method and
//! `x-crp/` extension to the handler in its own module.

use async_trait::async_trait;
use crp_core::{CrpError, Version};
use crp_core::provider::CallContext;
use crp_core::types::{
    Capability, ConformanceTier, Feature, LeaseParams, LeaseResult, ListParams, ListResult, ResolveParams,
    ResolveResult, RevokeParams, RevokeResult, UseParams, UseResult, ext,
};
use serde_json::Value;

use super::{PROVIDER_NAME, Vault};
use super::ext::{decode_ext, to_json};

#[async_trait]
impl crp_core::Provider for Vault {
    fn capability(&self, version: Version) -> Capability {
        let (features, conformance) = match version {
            Version::V0_1 => (vec![Feature::Resolve, Feature::Lease, Feature::Revoke, Feature::List], ConformanceTier::Standard),
            Version::V0_2 => (
                vec![
                    Feature::Use,
                    Feature::List,
                    Feature::Lease,
                    Feature::Revoke,
                    Feature::Delegate,
                    Feature::Broker,
                    Feature::Classify,
                ],
                ConformanceTier::Full,
            ),
        };
        Capability {
            version: version.to_string(),
            versions: crp_core::version::SUPPORTED.iter().map(|s| s.to_string()).collect(),
            provider: Some(PROVIDER_NAME.into()),
            features,
            conformance: Some(conformance),
        }
    }

    async fn use_credential(&self, ctx: &CallContext, params: UseParams) -> Result<UseResult, CrpError> {
        self.do_use(ctx, params).await
    }

    async fn resolve(&self, ctx: &CallContext, params: ResolveParams) -> Result<ResolveResult, CrpError> {
        self.do_resolve(ctx, params).await
    }

    async fn lease(&self, ctx: &CallContext, params: LeaseParams) -> Result<LeaseResult, CrpError> {
        self.do_lease(ctx, params).await
    }

    async fn revoke(&self, ctx: &CallContext, params: RevokeParams) -> Result<RevokeResult, CrpError> {
        self.do_revoke(ctx, params).await
    }

    async fn list(&self, ctx: &CallContext, params: ListParams) -> Result<ListResult, CrpError> {
        self.do_list(ctx, params).await
    }

    async fn extension(&self, ctx: &CallContext, method: &str, params: Value) -> Result<Value, CrpError> {
        match method {
            ext::VAULT_STORE => to_json(self.ext_store(ctx, decode_ext(params)?).await?),
            ext::VAULT_RETRIEVE => to_json(self.ext_retrieve(ctx, decode_ext(params)?).await?),
            ext::VAULT_DELETE => to_json(self.ext_delete(ctx, decode_ext(params)?).await?),
            ext::VAULT_LIST => to_json(self.ext_list(ctx, decode_ext(params)?).await?),
            ext::POLICY_CHECK => to_json(self.ext_policy_check(ctx, decode_ext(params)?).await?),
            ext::AUDIT_QUERY => to_json(self.ext_audit_query(ctx, decode_ext(params)?).await?),
            ext::WHOAMI => to_json(self.ext_whoami(ctx).await?),
            other => Err(CrpError::method_not_found(other)),
        }
    }
}
