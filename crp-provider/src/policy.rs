//! Cedar policy engine: the schema, loading and validating policy text, and turning Cedar's
//! allow/deny into CRP's graduated outcomes.
//!
//! This module owns [`CEDAR_SCHEMA`], [`PolicyEngine`], [`starter_policy`] (the file `init`
//! writes) and [`dev_policy`] (what `serve --dev` loads). It never sees credential material:
//! its inputs are names, classifications, tags and request context only.
//!
//! # Entity model
//! - principal `Agent::"<agent id>"`, a member of `Role::"<role>"` for each of its roles;
//! - resource `Credential::"<key>"` with attributes `key` (the credential key again, so that
//!   policies can write `resource.key like "aws/*"`), `service`, `classification` (the wire
//!   string: `public`, `internal`, `confidential`, `restricted`), `classificationLevel`
//!   (0 = public, 1 = internal, 2 = confidential, 3 = restricted, for ordered comparisons such
//!   as `resource.classificationLevel >= 2`) and `tags`;
//! - actions `use resolve retrieve list store delete renew release revoke delegate audit`;
//! - context `scopes`, `ttl`, optional `purpose` and `consumer` (test with `context has
//!   purpose` before reading them), `delegationDepth` and `now` (a Cedar `datetime`, filled in
//!   by the caller because Cedar has no clock).
//!
//! # Semantics
//! - Every policy carries `@id("...")` (unique); `@reason("...")` is the human reason shown in
//!   audit and `policy check`.
//! - Default deny; a satisfied `forbid` always wins.
//! - A `permit` may carry `@outcome("require_approval")` or `@outcome("quarantine")`. Among
//!   the satisfied permits the most restrictive outcome wins
//!   (`allow < require_approval < quarantine`). Any other `@outcome` value, or `@outcome` on a
//!   `forbid`, is a load error.
//! - A policy set is validated strictly against the schema when loaded; any error rejects the
//!   whole set, and [`PolicyEngine::replace`] then keeps the previous set in force.
//! - Fail closed at run time: if any policy fails to evaluate (e.g. integer overflow), the
//!   request is denied and the decision names that policy.
//!
//! ```
//! use crp_provider::policy::{Action, AuthzContext, CredentialAttrs, Outcome, PolicyEngine};
//! use crp_core::types::Classification;
//!
//! let engine = PolicyEngine::new(r#"
//!     @id("ci-use") @reason("CI may use non-secret CI credentials")
//!     permit (principal in Role::"ci", action == Action::"use", resource)
//!     when { resource.classificationLevel <= 1 && context.ttl <= 3600 };
//! "#).unwrap();
//! let tags = vec!["ci".to_string()];
//! let cred = CredentialAttrs { key: "gh/token", service: "github.com/api",
//!     classification: Classification::Internal, tags: &tags };
//! let ctx = AuthzContext { scopes: &[], ttl: 600, purpose: None, consumer: None,
//!     delegation_depth: 0, now: time::OffsetDateTime::now_utc() };
//! let d = engine.authorize("runner-1", &["ci".to_string()], Action::Use, &cred, &ctx);
//! assert_eq!(d.outcome, Outcome::Allow);
//! assert_eq!(d.policy.as_deref(), Some("ci-use"));
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, RwLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity,
    EntityId, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, Request, Response,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use crp_core::types::Classification;
use miette::Diagnostic;

/// The Cedar schema every policy set is validated against (Cedar schema syntax).
pub const CEDAR_SCHEMA: &str = r#"// CRP policy schema.
entity Role;
entity Agent in [Role];
entity Credential {
  // the credential key again (e.g. "aws/production"), for `resource.key like "aws/*"`
  key: String,
  // service id, e.g. "github.com/api"
  service: String,
  // "public" | "internal" | "confidential" | "restricted"
  classification: String,
  // 0 = public, 1 = internal, 2 = confidential, 3 = restricted
  classificationLevel: Long,
  tags: Set<String>,
};
type RequestCtx = {
  scopes: Set<String>,
  ttl: Long,
  purpose?: String,
  consumer?: String,
  delegationDepth: Long,
  now: datetime,
};
action "use", resolve, retrieve, list, store, delete, renew, release, revoke, delegate, audit
  appliesTo { principal: Agent, resource: Credential, context: RequestCtx };
"#;

/// File name used when rendering a [`PolicyError`] with [`fmt::Display`].
pub const POLICY_FILE_NAME: &str = "policy.cedar";

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// The actions of the policy schema.
///
/// ```
/// use crp_provider::policy::Action;
/// assert_eq!("retrieve".parse::<Action>().unwrap(), Action::Retrieve);
/// assert_eq!(Action::Use.as_str(), "use");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Use a credential through the proxy (no material leaves the provider).
    Use,
    /// v0.1 `crp/resolve` that returns material (an export).
    Resolve,
    /// `vault_retrieve`: read the value (an export).
    Retrieve,
    /// List credentials (metadata only).
    List,
    /// Store or overwrite a credential.
    Store,
    /// Delete a credential.
    Delete,
    /// Renew a lease.
    Renew,
    /// Release a lease.
    Release,
    /// Revoke a lease (and its subtree).
    Revoke,
    /// Delegate a child lease.
    Delegate,
    /// Read the audit log.
    Audit,
}

impl Action {
    /// Every action, in schema order.
    pub const ALL: [Action; 11] = [
        Action::Use,
        Action::Resolve,
        Action::Retrieve,
        Action::List,
        Action::Store,
        Action::Delete,
        Action::Renew,
        Action::Release,
        Action::Revoke,
        Action::Delegate,
        Action::Audit,
    ];

    /// The Cedar action id (`Action::"<this>"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Use => "use",
            Action::Resolve => "resolve",
            Action::Retrieve => "retrieve",
            Action::List => "list",
            Action::Store => "store",
            Action::Delete => "delete",
            Action::Renew => "renew",
            Action::Release => "release",
            Action::Revoke => "revoke",
            Action::Delegate => "delegate",
            Action::Audit => "audit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action `{s}`"))
    }
}

/// The graduated result of a decision. `Ord` orders by restrictiveness, so the most
/// restrictive of several outcomes is their `max`.
///
/// ```
/// use crp_provider::policy::Outcome;
/// assert!(Outcome::Allow < Outcome::RequireApproval);
/// assert!(Outcome::RequireApproval < Outcome::Quarantine);
/// assert!(Outcome::Quarantine < Outcome::Deny);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Permitted.
    Allow,
    /// Permitted once an operator approves (-33020).
    RequireApproval,
    /// Held for review (-33021).
    Quarantine,
    /// Denied (default deny, a forbid, or an evaluation error).
    Deny,
}

impl Outcome {
    /// `allow`, `require_approval`, `quarantine` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::RequireApproval => "require_approval",
            Outcome::Quarantine => "quarantine",
            Outcome::Deny => "deny",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision: the outcome, the determining policy's `@id` (none for default deny) and a
/// human reason (the policy's `@reason`, or a generated one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What the caller must do.
    pub outcome: Outcome,
    /// `@id` of the determining policy; `None` when nothing matched (default deny).
    pub policy: Option<String>,
    /// Human-readable reason.
    pub reason: String,
}

impl Decision {
    /// Whether the outcome is [`Outcome::Allow`].
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allow
    }
}

/// The resource side of a request: a credential's non-secret attributes.
#[derive(Debug, Clone, Copy)]
pub struct CredentialAttrs<'a> {
    /// Credential key, e.g. `aws/production` (the Cedar entity id).
    pub key: &'a str,
    /// Service id, e.g. `github.com/api`.
    pub service: &'a str,
    /// Sensitivity label.
    pub classification: Classification,
    /// Free-form tags.
    pub tags: &'a [String],
}

/// The request context.
#[derive(Debug, Clone, Copy)]
pub struct AuthzContext<'a> {
    /// Scopes requested.
    pub scopes: &'a [String],
    /// Requested TTL in seconds.
    pub ttl: u32,
    /// Stated purpose, if any.
    pub purpose: Option<&'a str>,
    /// Consumer (e.g. the downstream tool), if any.
    pub consumer: Option<&'a str>,
    /// 0 for a direct request, 1 for a child lease, ...
    pub delegation_depth: u32,
    /// The current time (Cedar has no clock).
    pub now: time::OffsetDateTime,
}

/// A policy load error with its position in the policy text (1-based line and column, in
/// characters). Several errors found at once are kept in `related`.
///
/// `Display` renders `policy.cedar:3:38: unexpected token ...`, one line per error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// What is wrong.
    pub message: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (characters), when known.
    pub column: Option<usize>,
    /// Further errors found in the same load (each without its own `related`).
    pub related: Vec<PolicyError>,
}

impl PolicyError {
    fn new(message: impl Into<String>, pos: Option<(usize, usize)>) -> Self {
        PolicyError {
            message: message.into(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            related: Vec::new(),
        }
    }

    /// Every error of this load: this one, then the related ones.
    pub fn all(&self) -> impl Iterator<Item = &PolicyError> {
        std::iter::once(self).chain(self.related.iter())
    }

    /// Render with another file name than [`POLICY_FILE_NAME`].
    pub fn render(&self, file: &str) -> String {
        let mut out = String::new();
        for (i, e) in self.all().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            match (e.line, e.column) {
                (Some(l), Some(c)) => out.push_str(&format!("{file}:{l}:{c}: {}", e.message)),
                (Some(l), None) => out.push_str(&format!("{file}:{l}: {}", e.message)),
                _ => out.push_str(&format!("{file}: {}", e.message)),
            }
        }
        out
    }

    /// Merge a list of errors into one (the first, with the rest as `related`).
    fn from_list(mut list: Vec<PolicyError>) -> PolicyError {
        if list.is_empty() {
            return PolicyError::new("invalid policy set", None);
        }
        let mut first = list.remove(0);
        first.related.extend(list);
        first
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(POLICY_FILE_NAME))
    }
}

impl std::error::Error for PolicyError {}

/// The commented starter policy `crp-provider init` writes.
///
/// The local owner's MCP agent (`Agent::"owner"`) may store, list, delete, use, renew,
/// release, revoke, delegate and read the audit log. Nobody may export material
/// (`retrieve` / `resolve`); a commented-out block shows how to allow an export of one key
/// when a purpose is stated.
pub fn starter_policy() -> &'static str {
    STARTER_POLICY
}

/// The policy `serve --dev` loads: agent `dev` may do everything except export
/// (`retrieve` / `resolve`).
pub fn dev_policy() -> &'static str {
    DEV_POLICY
}

const STARTER_POLICY: &str = r#"// CRP provider policy (Cedar, https://www.cedarpolicy.com).
//
// Loaded by `crp-provider serve` and checked with `crp-provider policy check`.
// The file is validated against the provider's schema when loaded; if it has an error the
// previous policies stay in force and the error names the line and column.
//
// Model:
//   principal  Agent::"<agent id>"  (in Role::"<role>" for each of its roles)
//   action     use, resolve, retrieve, list, store, delete, renew, release, revoke,
//              delegate, audit   ("retrieve" and "resolve" return the secret itself: exports)
//   resource   Credential::"<key>" with resource.key, resource.service,
//              resource.classification ("public" | "internal" | "confidential" | "restricted"),
//              resource.classificationLevel (0..3 in that order), resource.tags
//   context    context.scopes, context.ttl, context.delegationDepth, context.now (datetime),
//              and optionally context.purpose, context.consumer (test with `context has purpose`)
//
// Rules: nothing is allowed unless a permit matches; a matching forbid always wins.
// Every policy needs a unique @id("...") (shown in audit and policy checks) and should
// have a @reason("..."). A permit may add @outcome("require_approval") (an operator must
// approve, see `crp-provider approvals`) or @outcome("quarantine").

// The local owner's agent (stdio / embedded MCP) manages the vault and uses credentials
// through the proxy without ever seeing their values.
@id("owner-manage")
@reason("The local owner's agent may manage and use credentials")
permit (
  principal == Agent::"owner",
  action in [
    Action::"store", Action::"list", Action::"delete", Action::"use", Action::"renew",
    Action::"release", Action::"revoke", Action::"delegate", Action::"audit"
  ],
  resource
);

// Nobody may export a credential value (retrieve / resolve): no permit above allows it.
// To allow an export of one key, and only with a stated purpose, uncomment:
//
// @id("owner-export-deploy-key")
// @reason("The owner may export the deploy key when stating a purpose")
// permit (
//   principal == Agent::"owner",
//   action in [Action::"retrieve", Action::"resolve"],
//   resource == Credential::"ci/deploy-key"
// ) when {
//   context has purpose && context.purpose != ""
// };

// More examples:
//
// Ask an operator before anyone uses a restricted credential:
// @id("approve-restricted")
// @reason("Restricted credentials need approval")
// @outcome("require_approval")
// permit (principal in Role::"deploy", action == Action::"use", resource)
// when { resource.classificationLevel >= 3 && context.ttl <= 900 };
//
// Never delegate deeper than one level:
// @id("no-deep-delegation")
// @reason("Delegation chains deeper than 1 are forbidden")
// forbid (principal, action, resource) when { context.delegationDepth > 1 };
"#;

const DEV_POLICY: &str = r#"// serve --dev: the agent "dev" may do everything except export material.
@id("dev-all-but-export")
@reason("Development mode: the dev agent may do everything except export")
permit (
  principal == Agent::"dev",
  action in [
    Action::"use", Action::"list", Action::"store", Action::"delete", Action::"renew",
    Action::"release", Action::"revoke", Action::"delegate", Action::"audit"
  ],
  resource
);
"#;

// ---------------------------------------------------------------------------------------------
// Engine
// ---------------------------------------------------------------------------------------------

/// The loaded policy set. Cheap to clone (an `Arc` inside); clones share the set, so a
/// [`PolicyEngine::replace`] is seen by all of them.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<RwLock<Arc<Loaded>>>,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.current();
        f.debug_struct("PolicyEngine")
            .field("policies", &l.count)
            .finish()
    }
}

/// A parsed, validated policy set, split per action.
struct Loaded {
    src: String,
    count: usize,
    ids: Vec<String>,
    /// Policies that can apply to each action, indexed by `Action::index`.
    per_action: Vec<PolicySet>,
    /// Each policy's `@outcome` and `@reason`, by id, read once at load (looking an annotation
    /// up in a `PolicySet` parses its key with Cedar's parser on every call).
    notes: HashMap<String, Note>,
    /// Per action: whether no policy that can apply to it mentions `now` anywhere in its text
    /// (see [`Decisions`]).
    clockless: Vec<bool>,
    /// Decisions already made under these policies.
    decisions: Decisions,
}

/// Decisions memoised under one loaded policy set (a reload starts a new, empty one).
///
/// A decision is a pure function of the policies, the entities (built from the agent, its roles
/// and the credential's key, service, classification and tags alone: see [`entities_for`]) and
/// the request (action and context). The context's one input that is not the caller's is the
/// clock, so only actions whose applicable policies never mention `now` are memoised; the test
/// is on each policy's JSON form ([`mentions_now`]), so a policy that names `now` anywhere (even
/// in a string or an annotation) keeps its action out, which errs on the safe side. Everything else goes into
/// the key, length-prefixed so that no two different inputs share one. A full memo starts over.
#[derive(Default)]
struct Decisions(std::sync::Mutex<HashMap<String, Decision>>);

/// Entries kept in [`Decisions`] before it starts over.
const DECISION_MEMO_ENTRIES: usize = 4096;

/// A memo key: every part length-prefixed (no two different inputs share a key).
struct MemoKey(String);

impl MemoKey {
    fn new() -> Self {
        MemoKey(String::with_capacity(160))
    }

    fn part(&mut self, s: &str) -> &mut Self {
        use std::fmt::Write;
        let _ = write!(self.0, "{}:", s.len());
        self.0.push_str(s);
        self
    }

    fn list(&mut self, items: &[String]) -> &mut Self {
        self.part(&items.len().to_string());
        items.iter().for_each(|i| {
            self.part(i);
        });
        self
    }

    fn optional(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            None => self.part("-"),
            Some(v) => self.part("+").part(v),
        }
    }

    /// The inputs of the entities: agent, roles, credential.
    fn entities(agent: &str, roles: &[String], cred: &CredentialAttrs) -> Self {
        let mut k = MemoKey::new();
        k.part(agent).list(roles).part(cred.key).part(cred.service).part(cred.classification.as_str()).list(cred.tags);
        k
    }
}

/// What a satisfied policy means: its graduated outcome (`@outcome`) and `@reason`.
struct Note {
    outcome: Outcome,
    reason: Option<String>,
}

/// Schema and entity-type names, built once.
struct Statics {
    schema: Schema,
    agent: EntityTypeName,
    role: EntityTypeName,
    credential: EntityTypeName,
    actions: Vec<EntityUid>,
}

static STATICS: LazyLock<Result<Statics, PolicyError>> = LazyLock::new(build_statics);

fn build_statics() -> Result<Statics, PolicyError> {
    let (schema, _warnings) = Schema::from_cedarschema_str(CEDAR_SCHEMA).map_err(|e| {
        let mut pe = diag_to_error(CEDAR_SCHEMA, &e);
        pe.message = format!("built-in schema: {}", pe.message);
        pe
    })?;
    let tn = |s: &str| {
        EntityTypeName::from_str(s)
            .map_err(|e| PolicyError::new(format!("built-in entity type `{s}`: {e}"), None))
    };
    let action_type = tn("Action")?;
    let actions = Action::ALL
        .iter()
        .map(|a| EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a.as_str())))
        .collect();
    Ok(Statics {
        schema,
        agent: tn("Agent")?,
        role: tn("Role")?,
        credential: tn("Credential")?,
        actions,
    })
}

fn statics() -> Result<&'static Statics, PolicyError> {
    STATICS.as_ref().map_err(Clone::clone)
}

impl PolicyEngine {
    /// Parse and validate `src` against [`CEDAR_SCHEMA`].
    pub fn new(src: &str) -> Result<PolicyEngine, PolicyError> {
        let loaded = load(src)?;
        Ok(PolicyEngine {
            inner: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    /// Replace the policy set. On error the previous set stays in force.
    pub fn replace(&self, src: &str) -> Result<(), PolicyError> {
        let loaded = Arc::new(load(src)?);
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *guard = loaded;
        Ok(())
    }

    /// Check `src` without loading it; returns the number of policies.
    pub fn validate(src: &str) -> Result<usize, PolicyError> {
        load(src).map(|l| l.count)
    }

    /// Number of policies in force.
    pub fn policy_count(&self) -> usize {
        self.current().count
    }

    /// The `@id`s of the policies in force, sorted.
    pub fn policy_ids(&self) -> Vec<String> {
        self.current().ids.clone()
    }

    /// The source text of the policies in force.
    pub fn source(&self) -> String {
        self.current().src.clone()
    }

    fn current(&self) -> Arc<Loaded> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Decide whether `agent` (member of `roles`) may perform `action` on `cred`.
    ///
    /// Never fails: anything that prevents a decision (for example a policy that errors at
    /// evaluation) is a [`Outcome::Deny`] whose reason says why.
    pub fn authorize(
        &self,
        agent: &str,
        roles: &[String],
        action: Action,
        cred: &CredentialAttrs,
        ctx: &AuthzContext,
    ) -> Decision {
        let loaded = self.current();
        let st = match statics() {
            Ok(s) => s,
            Err(e) => return deny_internal(&format!("policy schema unavailable: {}", e.message)),
        };
        let pset = &loaded.per_action[action.index()];
        if pset.is_empty() {
            return default_deny();
        }
        if !loaded.clockless[action.index()] {
            return decide(st, &loaded, agent, roles, action, cred, ctx);
        }
        let mut key = MemoKey::entities(agent, roles, cred);
        key.part(action.as_str())
            .list(ctx.scopes)
            .part(&ctx.ttl.to_string())
            .optional(ctx.purpose)
            .optional(ctx.consumer)
            .part(&ctx.delegation_depth.to_string());
        let key = key.0;
        if let Ok(m) = loaded.decisions.0.lock()
            && let Some(d) = m.get(&key)
        {
            return d.clone();
        }
        let d = decide(st, &loaded, agent, roles, action, cred, ctx);
        if let Ok(mut m) = loaded.decisions.0.lock() {
            if m.len() >= DECISION_MEMO_ENTRIES {
                m.clear();
            }
            m.insert(key, d.clone());
        }
        d
    }
}

/// A decision made by Cedar (no memo).
fn decide(
    st: &Statics,
    loaded: &Loaded,
    agent: &str,
    roles: &[String],
    action: Action,
    cred: &CredentialAttrs,
    ctx: &AuthzContext,
) -> Decision {
    let entities = match entities_for(st, agent, roles, cred) {
        Ok(x) => x,
        Err(msg) => return deny_internal(&msg),
    };
    let request = match build_request(st, agent, action, cred, ctx) {
        Ok(x) => x,
        Err(msg) => return deny_internal(&msg),
    };
    let resp = Authorizer::new().is_authorized(&request, &loaded.per_action[action.index()], &entities);
    graduate(&loaded.notes, &resp)
}

fn default_deny() -> Decision {
    Decision {
        outcome: Outcome::Deny,
        policy: None,
        reason: "no policy permits this request (default deny)".into(),
    }
}

fn deny_internal(msg: &str) -> Decision {
    Decision {
        outcome: Outcome::Deny,
        policy: None,
        reason: format!("denied: {msg}"),
    }
}

/// Entity sets built (and checked against the schema) at most once per distinct input: they
/// depend on nothing but the agent, its roles and the credential's attributes, so an entry can
/// never be stale. A full map starts over.
const ENTITY_MEMO_ENTRIES: usize = 4096;

/// The entities of a decision: the agent, its roles and the credential, from the memo when the
/// same ones were built before.
fn entities_for(st: &Statics, agent: &str, roles: &[String], cred: &CredentialAttrs) -> Result<Arc<Entities>, String> {
    static MEMO: LazyLock<std::sync::Mutex<HashMap<String, Arc<Entities>>>> = LazyLock::new(Default::default);
    let key = MemoKey::entities(agent, roles, cred).0;
    if let Ok(m) = MEMO.lock()
        && let Some(e) = m.get(&key)
    {
        return Ok(e.clone());
    }
    let built = Arc::new(build_entities(st, agent, roles, cred)?);
    if let Ok(mut m) = MEMO.lock() {
        if m.len() >= ENTITY_MEMO_ENTRIES {
            m.clear();
        }
        m.insert(key, built.clone());
    }
    Ok(built)
}

fn str_set(v: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(v.iter().map(|s| RestrictedExpression::new_string(s.clone())))
}

fn build_entities(st: &Statics, agent: &str, roles: &[String], cred: &CredentialAttrs) -> Result<Entities, String> {
    let role_uids: HashSet<EntityUid> = roles
        .iter()
        .map(|r| EntityUid::from_type_name_and_id(st.role.clone(), EntityId::new(r)))
        .collect();
    let principal = EntityUid::from_type_name_and_id(st.agent.clone(), EntityId::new(agent));
    let resource = EntityUid::from_type_name_and_id(st.credential.clone(), EntityId::new(cred.key));
    let level = match cred.classification {
        Classification::Public => 0,
        Classification::Internal => 1,
        Classification::Confidential => 2,
        Classification::Restricted => 3,
    };
    let cred_entity = Entity::new(
        resource.clone(),
        HashMap::from([
            (
                "key".to_string(),
                RestrictedExpression::new_string(cred.key.to_string()),
            ),
            (
                "service".to_string(),
                RestrictedExpression::new_string(cred.service.to_string()),
            ),
            (
                "classification".to_string(),
                RestrictedExpression::new_string(cred.classification.as_str().to_string()),
            ),
            (
                "classificationLevel".to_string(),
                RestrictedExpression::new_long(level),
            ),
            ("tags".to_string(), str_set(cred.tags)),
        ]),
        HashSet::new(),
    )
    .map_err(|e| format!("credential attributes rejected: {e}"))?;
    let mut ents = Vec::with_capacity(roles.len() + 2);
    ents.push(Entity::new_no_attrs(principal.clone(), role_uids.clone()));
    ents.extend(
        role_uids
            .into_iter()
            .map(|r| Entity::new_no_attrs(r, HashSet::new())),
    );
    ents.push(cred_entity);
    Entities::from_entities(ents, Some(&st.schema)).map_err(|e| format!("entities rejected: {e}"))
}

fn build_request(st: &Statics, agent: &str, action: Action, cred: &CredentialAttrs, ctx: &AuthzContext) -> Result<Request, String> {
    let principal = EntityUid::from_type_name_and_id(st.agent.clone(), EntityId::new(agent));
    let resource = EntityUid::from_type_name_and_id(st.credential.clone(), EntityId::new(cred.key));
    let mut pairs = vec![
        ("scopes".to_string(), str_set(ctx.scopes)),
        (
            "ttl".to_string(),
            RestrictedExpression::new_long(i64::from(ctx.ttl)),
        ),
        (
            "delegationDepth".to_string(),
            RestrictedExpression::new_long(i64::from(ctx.delegation_depth)),
        ),
        ("now".to_string(), now_expr(ctx.now)?),
    ];
    if let Some(p) = ctx.purpose {
        pairs.push((
            "purpose".to_string(),
            RestrictedExpression::new_string(p.to_string()),
        ));
    }
    if let Some(c) = ctx.consumer {
        pairs.push((
            "consumer".to_string(),
            RestrictedExpression::new_string(c.to_string()),
        ));
    }
    let context = Context::from_pairs(pairs).map_err(|e| format!("context rejected: {e}"))?;
    let request = Request::new(
        principal,
        st.actions[action.index()].clone(),
        resource,
        context,
        Some(&st.schema),
    )
    .map_err(|e| format!("request rejected: {e}"))?;
    Ok(request)
}

/// `datetime("<now>")` as a Cedar expression. Building one parses the extension's name with
/// Cedar's parser, so the last one built is kept and reused while the clock is in the same
/// millisecond (concurrent requests mostly are).
fn now_expr(now: time::OffsetDateTime) -> Result<RestrictedExpression, String> {
    static LAST: std::sync::Mutex<Option<(String, RestrictedExpression)>> = std::sync::Mutex::new(None);
    let text = cedar_datetime(now)?;
    if let Ok(last) = LAST.lock()
        && let Some((t, e)) = last.as_ref()
        && *t == text
    {
        return Ok(e.clone());
    }
    let e = RestrictedExpression::new_datetime(&text);
    if let Ok(mut last) = LAST.lock() {
        *last = Some((text, e.clone()));
    }
    Ok(e)
}

/// `now` in the form Cedar's `datetime` accepts: `YYYY-MM-DDThh:mm:ss.SSSZ` (UTC).
fn cedar_datetime(now: time::OffsetDateTime) -> Result<String, String> {
    let t = now.to_offset(time::UtcOffset::UTC);
    if !(0..=9999).contains(&t.year()) {
        return Err("`now` is outside the years 0000..9999".into());
    }
    Ok(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    ))
}

/// Turn Cedar's response into a graduated [`Decision`].
fn graduate(notes: &HashMap<String, Note>, resp: &Response) -> Decision {
    let reason = |id: &PolicyId| notes.get(AsRef::<str>::as_ref(id)).and_then(|n| n.reason.as_deref()).filter(|r| !r.is_empty());
    // Fail closed: a policy that errored was skipped by Cedar; if it was a forbid, skipping
    // it would grant what it should have denied.
    let mut errs: Vec<(String, String)> = resp
        .diagnostics()
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                (pe.policy_id().to_string(), pe.inner().to_string())
            }
        })
        .collect();
    if !errs.is_empty() {
        errs.sort();
        let (id, msg) = errs.swap_remove(0);
        return Decision {
            outcome: Outcome::Deny,
            policy: Some(id.clone()),
            reason: format!("policy `{id}` failed to evaluate ({msg}); denying"),
        };
    }
    let mut ids: Vec<&PolicyId> = resp.diagnostics().reason().collect();
    ids.sort_by(|a, b| AsRef::<str>::as_ref(*a).cmp(AsRef::<str>::as_ref(*b)));
    match resp.decision() {
        CedarDecision::Deny => match ids.first() {
            None => default_deny(),
            Some(id) => Decision {
                outcome: Outcome::Deny,
                policy: Some(id.to_string()),
                reason: reason(id).map(str::to_string).unwrap_or_else(|| format!("forbidden by policy `{id}`")),
            },
        },
        CedarDecision::Allow => {
            let mut best: Option<(Outcome, &PolicyId)> = None;
            for id in ids {
                let o = notes.get(AsRef::<str>::as_ref(id)).map_or(Outcome::Allow, |n| n.outcome);
                // strictly greater: on ties the first id (sorted) is kept
                if best.is_none_or(|(b, _)| o > b) {
                    best = Some((o, id));
                }
            }
            match best {
                None => deny_internal("allow without a determining policy"),
                Some((outcome, id)) => Decision {
                    outcome,
                    policy: Some(id.to_string()),
                    reason: reason(id).map(str::to_string).unwrap_or_else(|| format!("permitted by policy `{id}`")),
                },
            }
        }
    }
}

/// The outcome a permit's `@outcome` annotation asks for (validated at load).
fn outcome_of(annotation: Option<&str>) -> Outcome {
    match annotation {
        Some("require_approval") => Outcome::RequireApproval,
        Some("quarantine") => Outcome::Quarantine,
        _ => Outcome::Allow,
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

fn load(src: &str) -> Result<Loaded, PolicyError> {
    let st = statics()?;
    let parsed = PolicySet::from_str(src).map_err(|errs| {
        let list: Vec<PolicyError> = errs.iter().map(|e| diag_to_error(src, e)).collect();
        PolicyError::from_list(dedup(list))
    })?;

    // Policies in source order ("policy0", "policy1", ...), with their start offsets.
    let mut raw: Vec<(usize, &Policy)> = parsed
        .policies()
        .map(|p| {
            let n = AsRef::<str>::as_ref(p.id())
                .strip_prefix("policy")
                .and_then(|n| n.parse().ok());
            (n.unwrap_or(usize::MAX), p)
        })
        .collect();
    raw.sort_by_key(|(n, _)| *n);
    let mut cursor = 0usize;
    let mut located: Vec<(Option<(usize, usize)>, &Policy)> = Vec::with_capacity(raw.len());
    for (_, p) in raw {
        let text = p.to_string();
        let pos = src
            .get(cursor..)
            .and_then(|rest| rest.find(&text))
            .map(|off| {
                let start = cursor + off;
                cursor = start + text.len();
                line_col(src, start)
            });
        located.push((pos, p));
    }

    let mut errors = Vec::new();
    if parsed.templates().next().is_some() {
        errors.push(PolicyError::new(
            "policy templates (with ?principal / ?resource slots) are not supported",
            None,
        ));
    }
    let mut seen: HashMap<String, Option<(usize, usize)>> = HashMap::new();
    let mut policies = Vec::with_capacity(located.len());
    for (pos, p) in &located {
        let id = match p.annotation("id") {
            Some(id) if !id.trim().is_empty() => id.to_string(),
            Some(_) => {
                errors.push(PolicyError::new("policy has an empty @id", *pos));
                continue;
            }
            None => {
                errors.push(PolicyError::new(
                    "policy has no @id(\"...\") annotation; every policy needs a unique @id",
                    *pos,
                ));
                continue;
            }
        };
        if let Some(first) = seen.get(&id) {
            let at = first
                .map(|(l, c)| format!(" (first defined at {l}:{c})"))
                .unwrap_or_default();
            errors.push(PolicyError::new(
                format!("duplicate policy @id `{id}`{at}"),
                *pos,
            ));
            continue;
        }
        seen.insert(id.clone(), *pos);
        match (p.effect(), p.annotation("outcome")) {
            (_, None) => {}
            (Effect::Permit, Some("require_approval" | "quarantine")) => {}
            (Effect::Permit, Some(other)) => errors.push(PolicyError::new(
                format!(
                    "policy `{id}`: unknown @outcome(\"{other}\") (expected \"require_approval\" or \"quarantine\")"
                ),
                *pos,
            )),
            (Effect::Forbid, Some(_)) => errors.push(PolicyError::new(
                format!("policy `{id}`: @outcome is only allowed on a permit"),
                *pos,
            )),
        }
        policies.push(p.new_id(PolicyId::new(&id)));
    }
    if !errors.is_empty() {
        return Err(PolicyError::from_list(errors));
    }

    let pset = PolicySet::from_policies(policies.iter().cloned())
        .map_err(|e| PolicyError::new(e.to_string(), None))?;
    let vr = Validator::new(st.schema.clone()).validate(&pset, ValidationMode::Strict);
    if !vr.validation_passed() {
        let mut seen_spans = HashSet::new();
        let mut list = Vec::new();
        for e in vr.validation_errors() {
            let span = first_label(e).map(|l| (l.offset(), l.len()));
            if !seen_spans.insert((e.policy_id().to_string(), span)) {
                continue; // the same mistake reported once per action
            }
            list.push(diag_to_error(src, e));
        }
        return Err(PolicyError::from_list(dedup(list)));
    }

    let mut buckets: Vec<Vec<Policy>> = vec![Vec::new(); Action::ALL.len()];
    for p in &policies {
        let targets: Vec<Action> = match p.action_constraint() {
            ActionConstraint::Any => Action::ALL.to_vec(),
            ActionConstraint::Eq(uid) => actions_of(std::slice::from_ref(&uid)),
            ActionConstraint::In(uids) => actions_of(&uids),
        };
        for a in targets {
            buckets[a.index()].push(p.clone());
        }
    }
    let clockless = buckets.iter().map(|ps| !ps.iter().any(mentions_now)).collect();
    let per_action = buckets
        .into_iter()
        .map(PolicySet::from_policies)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PolicyError::new(e.to_string(), None))?;
    let notes = policies
        .iter()
        .map(|p| {
            let note = Note { outcome: outcome_of(p.annotation("outcome")), reason: p.annotation("reason").map(str::to_string) };
            (AsRef::<str>::as_ref(p.id()).to_string(), note)
        })
        .collect();
    let mut ids: Vec<String> = seen.into_keys().collect();
    ids.sort();
    Ok(Loaded {
        src: src.to_string(),
        count: policies.len(),
        ids,
        per_action,
        notes,
        clockless,
        decisions: Decisions::default(),
    })
}

/// Whether `now` appears anywhere in the policy: in its JSON form (Cedar's EST), where string
/// escapes are decoded, so `context["no\u{77}"]` is caught as well as `context.now`. A policy
/// that cannot be rendered so counts as mentioning it.
fn mentions_now(p: &Policy) -> bool {
    p.to_json().map_or(true, |json| json.to_string().contains("now"))
}

/// The actions named by an action scope. An id that is not one of ours (impossible after
/// validation) conservatively maps to every action.
fn actions_of(uids: &[EntityUid]) -> Vec<Action> {
    let mut out = Vec::new();
    for uid in uids {
        match uid.id().unescaped().parse::<Action>() {
            Ok(a) if uid.type_name().to_string() == "Action" => out.push(a),
            _ => return Action::ALL.to_vec(),
        }
    }
    out
}

fn first_label(d: &dyn Diagnostic) -> Option<miette::LabeledSpan> {
    if let Some(mut labels) = d.labels()
        && let Some(l) = labels.next()
    {
        return Some(l);
    }
    d.related().and_then(|mut rel| rel.find_map(first_label))
}

/// A Cedar diagnostic as a [`PolicyError`]: message (plus help) and the position of its
/// first label.
fn diag_to_error(src: &str, d: &dyn Diagnostic) -> PolicyError {
    let mut msg = d.to_string();
    if let Some(help) = d.help() {
        msg.push_str(&format!(" (help: {help})"));
    }
    let pos = first_label(d).map(|l| line_col(src, l.offset()));
    PolicyError::new(msg, pos)
}

fn dedup(list: Vec<PolicyError>) -> Vec<PolicyError> {
    let mut seen = HashSet::new();
    list.into_iter()
        .filter(|e| seen.insert((e.message.clone(), e.line, e.column)))
        .collect()
}

/// Byte offset → 1-based (line, column in characters).
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(src.len());
    while !src.is_char_boundary(off) {
        off -= 1;
    }
    let before = &src[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    struct Req {
        agent: &'static str,
        roles: Vec<String>,
        action: Action,
        key: &'static str,
        service: &'static str,
        class: Classification,
        tags: Vec<String>,
        scopes: Vec<String>,
        ttl: u32,
        purpose: Option<&'static str>,
        consumer: Option<&'static str>,
        depth: u32,
        now: time::OffsetDateTime,
    }

    impl Default for Req {
        fn default() -> Self {
            Req {
                agent: "agent-1",
                roles: vec![],
                action: Action::Use,
                key: "aws/production",
                service: "aws",
                class: Classification::Confidential,
                tags: s(&["prod"]),
                scopes: s(&["read"]),
                ttl: 600,
                purpose: None,
                consumer: None,
                depth: 0,
                now: datetime!(2026-05-20 12:00 UTC),
            }
        }
    }

    /// `f` on the credential and the context `r` describes.
    fn with_inputs<T>(r: &Req, f: impl FnOnce(&CredentialAttrs, &AuthzContext) -> T) -> T {
        let cred = CredentialAttrs { key: r.key, service: r.service, classification: r.class, tags: &r.tags };
        let ctx = AuthzContext {
            scopes: &r.scopes,
            ttl: r.ttl,
            purpose: r.purpose,
            consumer: r.consumer,
            delegation_depth: r.depth,
            now: r.now,
        };
        f(&cred, &ctx)
    }

    fn run(e: &PolicyEngine, r: &Req) -> Decision {
        with_inputs(r, |cred, ctx| e.authorize(r.agent, &r.roles, r.action, cred, ctx))
    }

    /// The decision Cedar makes for `r`, bypassing both memos (decisions and entities).
    fn fresh(e: &PolicyEngine, r: &Req) -> Decision {
        with_inputs(r, |cred, ctx| {
            let (st, loaded) = (statics().unwrap(), e.current());
            let entities = build_entities(st, r.agent, &r.roles, cred).unwrap();
            let request = build_request(st, r.agent, r.action, cred, ctx).unwrap();
            let resp = Authorizer::new().is_authorized(&request, &loaded.per_action[r.action.index()], &entities);
            graduate(&loaded.notes, &resp)
        })
    }

    fn memoised(e: &PolicyEngine) -> usize {
        e.current().decisions.0.lock().unwrap().len()
    }

    /// Every input of a decision matters to one of these policies.
    const EVERY_INPUT: &str = r#"
        @id("p1") permit (principal in Role::"deploy", action == Action::"use", resource)
            when { resource.classification != "restricted" && context.ttl <= 600 };
        @id("p2") @outcome("require_approval") permit (principal, action == Action::"use", resource)
            when { context has purpose && context.purpose == "" };
        @id("p3") forbid (principal, action, resource) when { context has consumer && context.consumer == "x" };
        @id("p4") permit (principal == Agent::"a", action in [Action::"renew", Action::"delegate"], resource)
            when { context.delegationDepth < 2 && resource.tags.contains("prod") };
        @id("p5") permit (principal, action, resource)
            when { context.scopes.contains("a,b") && resource.service == "s1" && resource.key == "k2" };
        @id("p6") @outcome("quarantine") permit (principal in Role::"ops", action == Action::"use", resource)
            when { resource.classificationLevel >= 2 && context has consumer };
    "#;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
        /// A walk through requests drawn from small sets, each step changing one input of the
        /// one before (so that a key missing any input would answer with the previous step's
        /// decision): each memoised decision is the one Cedar makes afresh.
        #[test]
        fn memoised_decisions_are_the_ones_cedar_makes(
            start in proptest::prelude::any::<[u8; 12]>(),
            steps in proptest::collection::vec((0usize..12, proptest::prelude::any::<u8>()), 1..80),
        ) {
            let e = PolicyEngine::new(EVERY_INPUT).unwrap();
            let sets: [&[&str]; 4] = [&[], &["a,b"], &["a", "b"], &["b", "a,b"]];
            let texts = [None, Some(""), Some("x"), Some("ci")];
            let mut p = start;
            for (input, value) in std::iter::once((0, start[0])).chain(steps) {
                p[input] = value;
                let r = Req {
                    agent: ["a", "b"][usize::from(p[0] % 2)],
                    roles: s([&[][..], &["deploy"], &["ops"], &["deploy", "ops"]][usize::from(p[1] % 4)]),
                    action: [Action::Use, Action::Renew, Action::Delegate][usize::from(p[2] % 3)],
                    key: ["k1", "k2"][usize::from(p[3] % 2)],
                    service: ["s1", "s2"][usize::from(p[4] % 2)],
                    class: [Classification::Public, Classification::Internal, Classification::Confidential, Classification::Restricted][usize::from(p[5] % 4)],
                    tags: s([&[][..], &["prod"], &["dev"], &["prod", "dev"]][usize::from(p[6] % 4)]),
                    scopes: s(sets[usize::from(p[7] % 4)]),
                    ttl: [50, 600, 601][usize::from(p[8] % 3)],
                    purpose: texts[usize::from(p[9] % 4)],
                    consumer: texts[usize::from(p[10] % 4)],
                    depth: u32::from(p[11] % 3),
                    ..Default::default()
                };
                proptest::prop_assert_eq!(run(&e, &r), fresh(&e, &r), "after setting input {}", input);
            }
            proptest::prop_assert!(memoised(&e) > 0);
        }
    }

    #[test]
    fn a_decision_that_can_depend_on_the_clock_is_never_memoised() {
        let e = PolicyEngine::new(
            r#"@id("day") permit (principal, action == Action::"use", resource);
               @id("night") @outcome("quarantine") permit (principal, action == Action::"use", resource)
                   when { context.now.toTime() > duration("20h") };
               @id("renew") permit (principal, action == Action::"renew", resource);"#,
        )
        .unwrap();
        let day = Req { now: datetime!(2026-05-20 12:00 UTC), ..Default::default() };
        let night = Req { now: datetime!(2026-05-20 22:00 UTC), ..Default::default() };
        assert_eq!(run(&e, &day).outcome, Outcome::Allow);
        assert_eq!(run(&e, &night).outcome, Outcome::Quarantine);
        assert_eq!(run(&e, &day).outcome, Outcome::Allow);
        assert_eq!(memoised(&e), 0, "`use` has a policy that reads the clock");
        // The same, spelt with a string escape: still the clock.
        let escaped = PolicyEngine::new(
            r#"@id("day") permit (principal, action == Action::"use", resource);
               @id("night") @outcome("quarantine") permit (principal, action == Action::"use", resource)
                   when { context["no\u{77}"].toTime() > duration("20h") };"#,
        )
        .unwrap();
        assert_eq!(run(&escaped, &day).outcome, Outcome::Allow);
        assert_eq!(run(&escaped, &night).outcome, Outcome::Quarantine);
        assert_eq!(memoised(&escaped), 0);
        // `renew` has none: its decisions are memoised, and a reload starts over.
        let renew = Req { action: Action::Renew, ..Default::default() };
        assert_eq!(run(&e, &renew).outcome, Outcome::Allow);
        assert_eq!(memoised(&e), 1);
        e.replace(r#"@id("nothing") forbid (principal, action, resource);"#).unwrap();
        assert_eq!(run(&e, &renew).outcome, Outcome::Deny);
    }

    #[test]
    fn schema_parses() {
        assert!(statics().is_ok(), "{:?}", statics().err());
    }

    #[test]
    fn action_names_round_trip() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert!("export".parse::<Action>().is_err());
    }

    #[test]
    fn permit_allows_with_id_and_reason() {
        let e = PolicyEngine::new(
            r#"@id("deploy-use") @reason("Matched role: deploy")
               permit (principal in Role::"deploy", action == Action::"use", resource);"#,
        )
        .unwrap();
        let d = run(
            &e,
            &Req {
                roles: s(&["deploy"]),
                ..Default::default()
            },
        );
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(d.policy.as_deref(), Some("deploy-use"));
        assert_eq!(d.reason, "Matched role: deploy");
        assert!(d.is_allowed());
        // another role, or another action: not allowed
        assert_eq!(
            run(
                &e,
                &Req {
                    roles: s(&["ci"]),
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &Req {
                    roles: s(&["deploy"]),
                    action: Action::Retrieve,
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn default_deny_when_nothing_matches() {
        let e = PolicyEngine::new(
            r#"@id("ci") permit (principal == Agent::"ci", action == Action::"list", resource);"#,
        )
        .unwrap();
        let d = run(&e, &Req::default());
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy, None);
        assert!(d.reason.contains("default deny"), "{}", d.reason);
        // an empty policy set denies everything
        let empty = PolicyEngine::new("// nothing yet\n").unwrap();
        assert_eq!(empty.policy_count(), 0);
        assert_eq!(run(&empty, &Req::default()).outcome, Outcome::Deny);
    }

    #[test]
    fn forbid_wins_over_permit() {
        let e = PolicyEngine::new(
            r#"@id("all") @reason("everyone") permit (principal, action, resource);
               @id("no-deep-delegation") @reason("Delegation chains deeper than 1 are forbidden")
               forbid (principal, action, resource) when { context.delegationDepth > 1 };"#,
        )
        .unwrap();
        assert_eq!(
            run(
                &e,
                &Req {
                    depth: 1,
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Allow
        );
        let d = run(
            &e,
            &Req {
                depth: 2,
                ..Default::default()
            },
        );
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy.as_deref(), Some("no-deep-delegation"));
        assert_eq!(d.reason, "Delegation chains deeper than 1 are forbidden");
    }

    #[test]
    fn require_approval_outcome() {
        let e = PolicyEngine::new(
            r#"@id("approve-aws") @reason("AWS needs approval") @outcome("require_approval")
               permit (principal, action == Action::"use", resource) when { resource.service == "aws" };"#,
        )
        .unwrap();
        let d = run(&e, &Req::default());
        assert_eq!(d.outcome, Outcome::RequireApproval);
        assert_eq!(d.policy.as_deref(), Some("approve-aws"));
        assert_eq!(d.reason, "AWS needs approval");
        assert_eq!(
            run(
                &e,
                &Req {
                    service: "gcp",
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn most_restrictive_outcome_wins() {
        let src = r#"
            @id("a-plain") @reason("plain") permit (principal, action, resource);
            @id("b-approve") @reason("approve") @outcome("require_approval")
            permit (principal, action, resource) when { context.ttl > 100 };
            @id("c-quarantine") @reason("Secret retrieved outside business hours") @outcome("quarantine")
            permit (principal, action, resource) when { context.now.toTime() > duration("20h") };
        "#;
        let e = PolicyEngine::new(src).unwrap();
        assert_eq!(
            run(
                &e,
                &Req {
                    ttl: 50,
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Allow
        );
        let d = run(
            &e,
            &Req {
                ttl: 600,
                ..Default::default()
            },
        );
        assert_eq!(
            (d.outcome, d.policy.as_deref()),
            (Outcome::RequireApproval, Some("b-approve"))
        );
        let d = run(
            &e,
            &Req {
                ttl: 600,
                now: datetime!(2026-05-20 23:30 UTC),
                ..Default::default()
            },
        );
        assert_eq!(
            (d.outcome, d.policy.as_deref()),
            (Outcome::Quarantine, Some("c-quarantine"))
        );
        assert_eq!(d.reason, "Secret retrieved outside business hours");
        // and a forbid still beats all of them
        let e2 = PolicyEngine::new(&format!(
            "{src}\n@id(\"z-forbid\") forbid (principal, action, resource) when {{ context.ttl > 1000 }};"
        ))
        .unwrap();
        let d = run(
            &e2,
            &Req {
                ttl: 5000,
                now: datetime!(2026-05-20 23:30 UTC),
                ..Default::default()
            },
        );
        assert_eq!(
            (d.outcome, d.policy.as_deref()),
            (Outcome::Deny, Some("z-forbid"))
        );
        assert_eq!(d.reason, "forbidden by policy `z-forbid`");
    }

    #[test]
    fn bad_policy_file_reports_line_and_column_and_keeps_previous_set() {
        let good = r#"@id("owner") permit (principal == Agent::"agent-1", action, resource);"#;
        let e = PolicyEngine::new(good).unwrap();
        assert_eq!(run(&e, &Req::default()).outcome, Outcome::Allow);

        let bad =
            "@id(\"x\")\npermit (principal, action, resource)\nwhen { context.ttl > 5 && };\n";
        let err = e.replace(bad).unwrap_err();
        assert_eq!((err.line, err.column), (Some(3), Some(27)), "{err}");
        assert!(
            err.to_string()
                .starts_with("policy.cedar:3:27: unexpected token `}`"),
            "{err}"
        );
        // the previous set is still in force
        assert_eq!(run(&e, &Req::default()).outcome, Outcome::Allow);
        assert_eq!(e.policy_ids(), vec!["owner".to_string()]);
        assert_eq!(e.source(), good);
        assert!(PolicyEngine::validate(bad).is_err());
        assert!(PolicyEngine::new(bad).is_err());

        // a replace that succeeds takes effect for clones too
        let clone = e.clone();
        e.replace(r#"@id("nobody") forbid (principal, action, resource);"#)
            .unwrap();
        assert_eq!(run(&clone, &Req::default()).outcome, Outcome::Deny);
    }

    #[test]
    fn unknown_attribute_is_a_validation_error_with_position() {
        let src = "@id(\"ok\") permit (principal, action, resource);\n\
                   @id(\"bad-attr\")\npermit (principal, action, resource)\n  when { resource.servce == \"aws\" };\n";
        let err = PolicyEngine::validate(src).unwrap_err();
        assert_eq!((err.line, err.column), (Some(4), Some(10)), "{err}");
        assert!(err.message.contains("bad-attr"), "{err}");
        assert!(err.message.contains("servce"), "{err}");
        assert!(err.message.contains("did you mean `service`"), "{err}");
        assert!(
            err.related.is_empty(),
            "reported once, not once per action: {err}"
        );
    }

    #[test]
    fn optional_attribute_without_has_reported_once() {
        let src = "@id(\"bad-opt\")\npermit (principal, action, resource)\nwhen { context.purpose == \"x\" };";
        let err = PolicyEngine::validate(src).unwrap_err();
        assert_eq!(err.all().count(), 1, "{err}");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("purpose"), "{err}");
    }

    #[test]
    fn several_errors_are_all_reported() {
        let src = "@id(\"a\") permit (principal, action, resource) when { resource.nope };\n\
                   @id(\"b\") permit (principal, action, resource) when { context.zzz > 1 };\n";
        let err = PolicyEngine::validate(src).unwrap_err();
        let lines: Vec<_> = err.all().map(|e| e.line).collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            lines.contains(&Some(1)) && lines.contains(&Some(2)),
            "{err}"
        );
        assert_eq!(err.to_string().lines().count(), 2);
    }

    #[test]
    fn annotations_are_checked_at_load() {
        let missing = "@id(\"a\") permit (principal, action, resource);\n\npermit (principal, action, resource);";
        let err = PolicyEngine::validate(missing).unwrap_err();
        assert!(err.message.contains("no @id"), "{err}");
        assert_eq!(err.line, Some(3), "{err}");

        let dup = "@id(\"a\") permit (principal, action, resource);\n@id(\"a\") forbid (principal, action, resource);";
        let err = PolicyEngine::validate(dup).unwrap_err();
        assert!(err.message.contains("duplicate policy @id `a`"), "{err}");
        assert!(err.message.contains("first defined at 1:1"), "{err}");
        assert_eq!(err.line, Some(2), "{err}");

        let bad_outcome = r#"@id("a") @outcome("maybe") permit (principal, action, resource);"#;
        assert!(
            PolicyEngine::validate(bad_outcome)
                .unwrap_err()
                .message
                .contains("unknown @outcome")
        );

        let forbid_outcome =
            r#"@id("a") @outcome("quarantine") forbid (principal, action, resource);"#;
        assert!(
            PolicyEngine::validate(forbid_outcome)
                .unwrap_err()
                .message
                .contains("only allowed on a permit")
        );

        let empty_id = r#"@id("") permit (principal, action, resource);"#;
        assert!(
            PolicyEngine::validate(empty_id)
                .unwrap_err()
                .message
                .contains("empty @id")
        );

        let template = r#"@id("t") permit (principal == ?principal, action, resource);"#;
        assert!(
            PolicyEngine::validate(template)
                .unwrap_err()
                .message
                .contains("templates")
        );

        let unknown_action =
            r#"@id("a") permit (principal, action == Action::"export", resource);"#;
        assert!(PolicyEngine::validate(unknown_action).is_err());

        assert_eq!(
            PolicyEngine::validate(
                r#"@id("a") permit (principal, action, resource); @id("b") @outcome("quarantine") permit (principal, action, resource);"#
            ),
            Ok(2)
        );
    }

    #[test]
    fn context_is_used_in_conditions() {
        let e = PolicyEngine::new(
            r#"@id("scoped") @reason("scoped, short, with purpose, before June")
               permit (principal, action == Action::"use", resource)
               when {
                 context.scopes.contains("deploy") && context.ttl <= 3600 &&
                 context has purpose && context.purpose like "ticket-*" &&
                 context.now < datetime("2026-06-01T00:00:00Z")
               }
               unless { context has consumer && context.consumer == "evil-tool" };"#,
        )
        .unwrap();
        let ok = Req {
            scopes: s(&["deploy", "read"]),
            purpose: Some("ticket-42"),
            ..Default::default()
        };
        assert_eq!(run(&e, &ok).outcome, Outcome::Allow);
        assert_eq!(
            run(
                &e,
                &Req {
                    scopes: s(&["read"]),
                    ..ok
                }
            )
            .outcome,
            Outcome::Deny
        );
        let ok = || Req {
            scopes: s(&["deploy"]),
            purpose: Some("ticket-42"),
            ..Default::default()
        };
        assert_eq!(run(&e, &Req { ttl: 7200, ..ok() }).outcome, Outcome::Deny);
        assert_eq!(
            run(
                &e,
                &Req {
                    purpose: None,
                    ..ok()
                }
            )
            .outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &Req {
                    purpose: Some("fun"),
                    ..ok()
                }
            )
            .outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &Req {
                    now: datetime!(2026-06-01 00:00:01 UTC),
                    ..ok()
                }
            )
            .outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &Req {
                    consumer: Some("evil-tool"),
                    ..ok()
                }
            )
            .outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &Req {
                    consumer: Some("claude"),
                    ..ok()
                }
            )
            .outcome,
            Outcome::Allow
        );
        // `now` in another offset is converted to UTC
        assert_eq!(
            run(
                &e,
                &Req {
                    now: datetime!(2026-06-01 01:30 +02:00),
                    ..ok()
                }
            )
            .outcome,
            Outcome::Allow
        );
    }

    #[test]
    fn resource_attributes_and_classification_levels() {
        let e = PolicyEngine::new(
            r#"@id("low") permit (principal, action == Action::"use", resource)
                 when { resource.classificationLevel <= 1 };
               @id("named") permit (principal, action == Action::"list", resource)
                 when { ["public", "internal"].contains(resource.classification) && resource.key like "gh/*" };
               @id("tagged") permit (principal, action == Action::"renew", resource)
                 when { resource.tags.contains("renewable") };"#,
        )
        .unwrap();
        let r = |action, key, class, tags: &[&str]| Req {
            action,
            key,
            class,
            tags: s(tags),
            ..Default::default()
        };
        assert_eq!(
            run(&e, &r(Action::Use, "x", Classification::Public, &[])).outcome,
            Outcome::Allow
        );
        assert_eq!(
            run(&e, &r(Action::Use, "x", Classification::Internal, &[])).outcome,
            Outcome::Allow
        );
        assert_eq!(
            run(&e, &r(Action::Use, "x", Classification::Confidential, &[])).outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(&e, &r(Action::Use, "x", Classification::Restricted, &[])).outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &r(Action::List, "gh/token", Classification::Internal, &[])
            )
            .outcome,
            Outcome::Allow
        );
        assert_eq!(
            run(&e, &r(Action::List, "aws/x", Classification::Internal, &[])).outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &r(Action::List, "gh/token", Classification::Restricted, &[])
            )
            .outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(
                &e,
                &r(Action::Renew, "k", Classification::Public, &["renewable"])
            )
            .outcome,
            Outcome::Allow
        );
        assert_eq!(
            run(
                &e,
                &r(Action::Renew, "k", Classification::Public, &["other"])
            )
            .outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn resource_and_principal_equality_and_odd_names() {
        let e = PolicyEngine::new(
            r#"@id("one") permit (principal == Agent::"we\"ird", action, resource == Credential::"aws/prod");"#,
        )
        .unwrap();
        let d = run(
            &e,
            &Req {
                agent: "we\"ird",
                key: "aws/prod",
                ..Default::default()
            },
        );
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(
            run(
                &e,
                &Req {
                    agent: "we\"ird",
                    key: "aws/dev",
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn evaluation_error_denies_naming_the_policy() {
        let e = PolicyEngine::new(
            r#"@id("all") permit (principal, action, resource);
               @id("overflowing") forbid (principal, action, resource)
                 when { context.ttl * 9223372036854775807 > 0 };"#,
        )
        .unwrap();
        // ttl 1: no overflow, the forbid fires
        assert_eq!(
            run(
                &e,
                &Req {
                    ttl: 1,
                    ..Default::default()
                }
            )
            .policy
            .as_deref(),
            Some("overflowing")
        );
        // ttl 2: the forbid overflows; Cedar would skip it and allow, we deny
        let d = run(
            &e,
            &Req {
                ttl: 2,
                ..Default::default()
            },
        );
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy.as_deref(), Some("overflowing"));
        assert!(
            d.reason.contains("`overflowing` failed to evaluate"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn policies_split_per_action_still_see_unscoped_policies() {
        let e = PolicyEngine::new(
            r#"@id("any") permit (principal, action, resource) when { context.ttl < 10 };
               @id("two") permit (principal, action in [Action::"list", Action::"audit"], resource);"#,
        )
        .unwrap();
        for a in Action::ALL {
            assert_eq!(
                run(
                    &e,
                    &Req {
                        action: a,
                        ttl: 5,
                        ..Default::default()
                    }
                )
                .outcome,
                Outcome::Allow,
                "{a}"
            );
            let expect = if matches!(a, Action::List | Action::Audit) {
                Outcome::Allow
            } else {
                Outcome::Deny
            };
            assert_eq!(
                run(
                    &e,
                    &Req {
                        action: a,
                        ttl: 50,
                        ..Default::default()
                    }
                )
                .outcome,
                expect,
                "{a}"
            );
        }
    }

    #[test]
    fn starter_policy_validates_and_behaves_as_described() {
        let src = starter_policy();
        assert_eq!(PolicyEngine::validate(src), Ok(1));
        let e = PolicyEngine::new(src).unwrap();
        let owner = |action| Req {
            agent: "owner",
            action,
            ..Default::default()
        };
        for a in [
            Action::Store,
            Action::List,
            Action::Delete,
            Action::Use,
            Action::Renew,
            Action::Release,
            Action::Revoke,
            Action::Delegate,
            Action::Audit,
        ] {
            let d = run(&e, &owner(a));
            assert_eq!(d.outcome, Outcome::Allow, "{a}");
            assert_eq!(d.policy.as_deref(), Some("owner-manage"));
        }
        for a in [Action::Retrieve, Action::Resolve] {
            assert_eq!(
                run(
                    &e,
                    &Req {
                        purpose: Some("deploy"),
                        ..owner(a)
                    }
                )
                .outcome,
                Outcome::Deny,
                "{a}"
            );
        }
        // other agents get nothing
        for a in Action::ALL {
            assert_eq!(
                run(
                    &e,
                    &Req {
                        agent: "someone",
                        action: a,
                        ..Default::default()
                    }
                )
                .outcome,
                Outcome::Deny
            );
        }

        // Uncommenting the export example allows exactly that key, with a purpose.
        let start = src.find("// @id(\"owner-export-deploy-key\")").unwrap();
        let end = start + src[start..].find("// };").unwrap() + "// };".len();
        let uncommented: String = src[start..end]
            .lines()
            .map(|l| l.strip_prefix("// ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let widened = format!("{}{}{}", &src[..start], uncommented, &src[end..]);
        assert_eq!(PolicyEngine::validate(&widened), Ok(2), "{widened}");
        let e = PolicyEngine::new(&widened).unwrap();
        let export = |key, purpose| Req {
            agent: "owner",
            action: Action::Retrieve,
            key,
            purpose,
            ..Default::default()
        };
        let d = run(&e, &export("ci/deploy-key", Some("rotate the CI key")));
        assert_eq!(
            (d.outcome, d.policy.as_deref()),
            (Outcome::Allow, Some("owner-export-deploy-key"))
        );
        assert_eq!(
            run(&e, &export("ci/deploy-key", None)).outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(&e, &export("ci/deploy-key", Some(""))).outcome,
            Outcome::Deny
        );
        assert_eq!(
            run(&e, &export("aws/production", Some("x"))).outcome,
            Outcome::Deny
        );

        // the other commented examples are valid too
        let tail = widened.find("// More examples:").unwrap();
        let examples: String = widened[tail..]
            .lines()
            .map(|l| match l.strip_prefix("// ") {
                Some(rest)
                    if ["@", "permit", "forbid", "when"]
                        .iter()
                        .any(|p| rest.starts_with(p)) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all_uncommented = format!("{}{}", &widened[..tail], examples);
        assert_eq!(
            PolicyEngine::validate(&all_uncommented),
            Ok(4),
            "{all_uncommented}"
        );
    }

    #[test]
    fn dev_policy_allows_all_but_export() {
        let e = PolicyEngine::new(dev_policy()).unwrap();
        for a in Action::ALL {
            let d = run(
                &e,
                &Req {
                    agent: "dev",
                    action: a,
                    purpose: Some("p"),
                    ..Default::default()
                },
            );
            let expect = if matches!(a, Action::Retrieve | Action::Resolve) {
                Outcome::Deny
            } else {
                Outcome::Allow
            };
            assert_eq!(d.outcome, expect, "{a}");
        }
        assert_eq!(
            run(
                &e,
                &Req {
                    agent: "owner",
                    ..Default::default()
                }
            )
            .outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn line_col_counts_characters() {
        let src = "ab\nçd€x\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 3), (2, 1));
        assert_eq!(line_col(src, "ab\nçd€".len()), (2, 4));
        assert_eq!(line_col(src, 4), (2, 1)); // inside `ç`: floors to its start
        assert_eq!(line_col(src, 999), (3, 1));
    }

    #[test]
    fn error_display_without_position() {
        let e = PolicyError::new("boom", None);
        assert_eq!(e.to_string(), "policy.cedar: boom");
        assert_eq!(
            PolicyError::new("x", Some((2, 3))).render("p.cedar"),
            "p.cedar:2:3: x"
        );
    }

    #[test]
    fn concurrent_reads_and_replace() {
        let e = PolicyEngine::new(r#"@id("a") permit (principal, action, resource);"#).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..4 {
                let e = e.clone();
                sc.spawn(move || {
                    for _ in 0..50 {
                        let d = run(&e, &Req::default());
                        assert!(
                            matches!(d.policy.as_deref(), Some("a") | Some("b")),
                            "{d:?}"
                        );
                    }
                });
            }
            for _ in 0..20 {
                e.replace(r#"@id("b") permit (principal, action, resource);"#)
                    .unwrap();
                e.replace(r#"@id("a") permit (principal, action, resource);"#)
                    .unwrap();
            }
        });
    }
}
