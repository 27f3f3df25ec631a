//! `serve --dev`: the quick start. A throwaway vault in a temporary directory (deleted on
//! exit), optionally loaded with a conformance fixture file and/or an `apply` TOML file, and unauthenticated loopback
//! callers acting as agent `dev`. Loudly labelled on stderr: never for real credentials.

use std::path::Path;

use crate::vault::Vault;

/// The banner printed to stderr.
pub const BANNER: &str = "\
************************************************************************
*  crp-provider DEV MODE: throwaway vault, deleted on exit.            *
*  Unauthenticated callers on loopback act as agent `dev`.             *
*  Never put real credentials here.                                    *
************************************************************************";

/// Open a throwaway vault and load `fixtures` (a `crp-conformance fixtures` JSON file).
///
/// Without fixtures the dev policy is installed (agent `dev` may do everything but export).
/// With fixtures their access table is the policy (the loader gives `dev` the outcomes of the
/// fixture's first agent), so intended denials stay denials.
///
/// `apply` is a `crp-provider apply` TOML document loaded after that (e.g. a credential
/// whose upstream is a local test service, with `allow_private_hosts`).
pub async fn open_dev_vault(fixtures: Option<&Path>, apply: Option<&Path>) -> anyhow::Result<(Vault, tempfile::TempDir)> {
    let (vault, dir) = Vault::open_ephemeral().await.map_err(|e| anyhow::anyhow!("cannot create the dev vault: {e}"))?;
    if fixtures.is_none() {
        vault
            .install_policy("10-dev.cedar", crate::policy::dev_policy())
            .map_err(|e| anyhow::anyhow!("cannot install the dev policy: {e}"))?;
    }
    if let Some(path) = fixtures {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read fixtures {}: {e}", path.display()))?;
        let f: crp_core::fixtures::Fixtures = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("fixtures {}: not a fixture file: line {} column {}", path.display(), e.line(), e.column()))?;
        f.validate().map_err(|e| anyhow::anyhow!("fixtures {}: {e}", path.display()))?;
        vault
            .load_fixtures(&f)
            .await
            .map_err(|e| anyhow::anyhow!("cannot load fixtures {}: {e}", path.display()))?;
        eprintln!("crp-provider: loaded {} fixture credential(s) from {}", f.credentials.len(), path.display());
    }
    if let Some(path) = apply {
        let doc = crate::apply::ApplyDoc::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let report = vault.apply(&doc).await.map_err(|e| anyhow::anyhow!("cannot apply {}: {e}", path.display()))?;
        eprintln!(
            "crp-provider: applied {}: {} credential(s), {} agent(s)",
            path.display(),
            report.credentials_changed.len(),
            report.agents_changed.len()
        );
    }
    Ok((vault, dir))
}
