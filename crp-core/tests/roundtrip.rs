//! Property tests over crp-core's wire types and entry points:
//!
//! - every wire type survives JSON encode → decode unchanged;
//! - `Classification` is totally ordered in the spec's order;
//! - `version::negotiate` never panics and follows the rules (majors match, lower minor wins);
//! - `Dispatcher::handle_bytes` never panics, answers every non-notification with well-formed
//!   JSON-RPC and stays silent for notifications, and never echoes a canary from params;
//! - `SecretValue`'s `Debug` (and that of types holding one) never shows the value.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use crp_core::jsonrpc::{Id, Request, Response};
use crp_core::provider::Transport;
use crp_core::types::ext::{self, InjectionRule};
use crp_core::types::*;
use crp_core::version::{self, Version};
use crp_core::{CallContext, CrpError, Dispatcher, ErrorCode, ErrorData, Provider, SecretValue};
use proptest::collection::{btree_map, vec};
use proptest::option::of;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Strategies.

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,16}"
}
fn word() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._:-]{1,16}"
}
fn service() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._/-]{1,32}"
}
fn words() -> impl Strategy<Value = Vec<String>> {
    vec(word(), 0..4)
}
fn timestamp() -> impl Strategy<Value = String> {
    (2000u32..2100, 1u32..=12, 1u32..=28, 0u32..24, 0u32..60, 0u32..60)
        .prop_map(|(y, mo, d, h, mi, s)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"))
}
fn secret() -> impl Strategy<Value = SecretValue> {
    text().prop_map(SecretValue::new)
}

fn classification() -> impl Strategy<Value = Classification> {
    prop_oneof![
        Just(Classification::Public),
        Just(Classification::Internal),
        Just(Classification::Confidential),
        Just(Classification::Restricted),
    ]
}
fn credential_type() -> impl Strategy<Value = CredentialType> {
    prop_oneof![
        Just(CredentialType::ApiKey),
        Just(CredentialType::OauthBearer),
        Just(CredentialType::BasicAuth),
        Just(CredentialType::ClientCertificate),
        Just(CredentialType::ConnectionString),
        Just(CredentialType::Custom),
    ]
}
fn feature() -> impl Strategy<Value = Feature> {
    prop_oneof![
        Just(Feature::Use),
        Just(Feature::Resolve),
        Just(Feature::Lease),
        Just(Feature::Revoke),
        Just(Feature::List),
        Just(Feature::Delegate),
        Just(Feature::Broker),
        Just(Feature::Classify),
        Just(Feature::Consent),
    ]
}
fn tier() -> impl Strategy<Value = ConformanceTier> {
    prop_oneof![Just(ConformanceTier::Basic), Just(ConformanceTier::Standard), Just(ConformanceTier::Full)]
}
fn reason() -> impl Strategy<Value = RevokeReason> {
    prop_oneof![
        Just(RevokeReason::CredentialCompromised),
        Just(RevokeReason::PolicyViolation),
        Just(RevokeReason::ManualRevocation),
        Just(RevokeReason::Rotation),
    ]
}

fn context() -> impl Strategy<Value = RequestContext> {
    (of(text()), of(text()), of(text()), of(text()), of(text())).prop_map(
        |(consumer, consumer_version, requestor, purpose, trace_id)| RequestContext {
            consumer,
            consumer_version,
            requestor,
            purpose,
            trace_id,
        },
    )
}
fn lease() -> impl Strategy<Value = Lease> {
    (word(), timestamp(), any::<u32>(), any::<bool>(), of(0u32..16)).prop_map(
        |(id, expires_at, ttl, renewable, delegation_depth)| Lease { id, expires_at, ttl, renewable, delegation_depth },
    )
}
fn descriptor() -> impl Strategy<Value = CredentialDescriptor> {
    (credential_type(), any::<bool>(), any::<bool>(), classification()).prop_map(
        |(credential_type, brokered, auto_refresh, classification)| CredentialDescriptor {
            credential_type,
            brokered,
            auto_refresh,
            classification,
        },
    )
}
fn material() -> impl Strategy<Value = CredentialMaterial> {
    prop_oneof![
        (secret(), word(), of(word())).prop_map(|(key, header, prefix)| CredentialMaterial::ApiKey { key, header, prefix }),
        (secret(), word(), of(any::<u64>()))
            .prop_map(|(token, token_type, expires_in)| CredentialMaterial::OauthBearer { token, token_type, expires_in }),
        (text(), secret()).prop_map(|(username, password)| CredentialMaterial::BasicAuth { username, password }),
        (text(), secret(), vec(text(), 0..3), of(secret())).prop_map(|(certificate, private_key, chain, passphrase)| {
            CredentialMaterial::ClientCertificate { certificate, private_key, chain, passphrase }
        }),
        (secret(), of(word())).prop_map(|(value, dialect)| CredentialMaterial::ConnectionString { value, dialect }),
        (word(), btree_map(word(), secret(), 0..4))
            .prop_map(|(custom_type, data)| CredentialMaterial::Custom { custom_type, data }),
    ]
}

fn use_params() -> impl Strategy<Value = UseParams> {
    (
        service(),
        words(),
        of(1u32..=86_400),
        of((word(), of(1u32..=16)).prop_map(|(parent_lease_id, max_depth)| Delegation { parent_lease_id, max_depth })),
        of(word()),
        of(context()),
    )
        .prop_map(|(service, scopes, ttl, delegation, identity_scope, context)| UseParams {
            service,
            scopes,
            ttl,
            delegation,
            identity_scope,
            context,
        })
}
fn use_result() -> impl Strategy<Value = UseResult> {
    (lease(), word(), of(word()), service(), words(), descriptor()).prop_map(
        |(lease, id, session_token, service, granted_scopes, credential_descriptor)| UseResult {
            proxy_base_url: format!("http://127.0.0.1:7700/api/v1/proxy/t/{id}"),
            lease,
            session_token,
            service,
            granted_scopes,
            credential_descriptor,
        },
    )
}
fn resolve_params() -> impl Strategy<Value = ResolveParams> {
    (service(), words(), of(credential_type()), of(1u32..=86_400), of(context())).prop_map(
        |(service, scopes, credential_type, ttl, context)| ResolveParams { service, scopes, credential_type, ttl, context },
    )
}
fn resolve_result() -> impl Strategy<Value = ResolveResult> {
    (material(), lease(), service(), words(), of((word(), timestamp()))).prop_map(
        |(credential, lease, service, granted_scopes, metadata)| ResolveResult {
            credential,
            lease,
            service,
            granted_scopes,
            metadata: metadata.map(|(provider, resolved_at)| ResolveMetadata { provider, resolved_at }),
        },
    )
}
fn lease_params() -> impl Strategy<Value = LeaseParams> {
    (prop_oneof![Just(LeaseAction::Renew), Just(LeaseAction::Release)], word(), of(1u32..=86_400))
        .prop_map(|(action, lease_id, ttl)| LeaseParams { action, lease_id, ttl })
}
fn lease_result() -> impl Strategy<Value = LeaseResult> {
    prop_oneof![
        (lease(), of(word()), of(material())).prop_map(|(lease, proxy_base_url, credential)| {
            LeaseResult::Renewed(LeaseRenewed { lease, proxy_base_url, credential })
        }),
        (any::<bool>(), word()).prop_map(|(released, lease_id)| LeaseResult::Released(LeaseReleased { released, lease_id })),
    ]
}
fn revoke_params() -> impl Strategy<Value = RevokeParams> {
    (word(), reason(), of(text())).prop_map(|(lease_id, reason, detail)| RevokeParams { lease_id, reason, detail })
}
fn revoke_result() -> impl Strategy<Value = RevokeResult> {
    (any::<bool>(), word(), timestamp(), words()).prop_map(|(revoked, lease_id, revoked_at, affected_leases)| {
        RevokeResult { revoked, lease_id, revoked_at, affected_leases }
    })
}
fn list_params() -> impl Strategy<Value = ListParams> {
    (
        of((of(text()), of(credential_type()))
            .prop_map(|(service_prefix, credential_type)| ListFilter { service_prefix, credential_type })),
        of(context()),
        of(text()),
        of(1u32..=500),
    )
        .prop_map(|(filter, context, cursor, limit)| ListParams { filter, context, cursor, limit })
}
fn service_entry() -> impl Strategy<Value = ServiceEntry> {
    (service(), vec(credential_type(), 0..3), of(words()), of(any::<u32>()), of(text()), of(classification())).prop_map(
        |(service, credential_types, available_scopes, max_ttl, description, classification)| ServiceEntry {
            service,
            credential_types,
            available_scopes,
            max_ttl,
            description,
            classification,
        },
    )
}
fn list_result() -> impl Strategy<Value = ListResult> {
    (vec(service_entry(), 0..3), of(text())).prop_map(|(services, cursor)| ListResult { services, cursor })
}
fn capability() -> impl Strategy<Value = Capability> {
    ("[0-9]{1,2}\\.[0-9]{1,2}", vec("[0-9]\\.[0-9]", 0..3), of(word()), vec(feature(), 0..5), of(tier())).prop_map(
        |(version, versions, provider, features, conformance)| Capability { version, versions, provider, features, conformance },
    )
}
// Field by field from the default, so that a field added to ErrorData later keeps this compiling.
#[allow(clippy::field_reassign_with_default)]
fn error_data() -> impl Strategy<Value = ErrorData> {
    (
        (of(word()), of(words()), of(words()), of(text()), of(word())),
        (of(any::<u64>()), of(text()), of(word()), of(word()), of(service()), of(any::<u32>()), of(word())),
    )
        .prop_map(|((error, supported, denied_scopes, reason, policy), (retry_after, limit, approval_id, lease_id, service, max_depth, trace_id))| {
            let mut d = ErrorData::default();
            d.error = error;
            d.supported = supported;
            d.denied_scopes = denied_scopes;
            d.reason = reason;
            d.policy = policy;
            d.retry_after = retry_after;
            d.limit = limit;
            d.approval_id = approval_id;
            d.lease_id = lease_id;
            d.service = service;
            d.max_depth = max_depth;
            d.trace_id = trace_id;
            d
        })
}
fn crp_error() -> impl Strategy<Value = CrpError> {
    (any::<i64>(), text(), of(error_data())).prop_map(|(code, message, data)| CrpError { code, message, data })
}

fn json_value() -> impl Strategy<Value = Value> {
    // No floats: JSON's decimal text does not promise bit-exact f64 round trips.
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-zA-Z]{1,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
fn json_object() -> impl Strategy<Value = Value> {
    btree_map("[a-zA-Z]{1,6}", json_value(), 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
}
fn id() -> impl Strategy<Value = Id> {
    prop_oneof![any::<i64>().prop_map(Id::from), any::<u64>().prop_map(|n| Id::Number(n.into())), text().prop_map(Id::String)]
}
fn request() -> impl Strategy<Value = Request> {
    (of(id()), text(), of(prop_oneof![json_object(), vec(json_value(), 0..3).prop_map(Value::Array)])).prop_map(
        |(id, method, params)| Request { jsonrpc: "2.0".into(), id, method, params },
    )
}
fn response() -> impl Strategy<Value = Response> {
    (of(id()), prop_oneof![json_value().prop_map(Ok), crp_error().prop_map(Err)]).prop_map(|(id, outcome)| match outcome {
        Ok(v) => Response::result(id, v),
        Err(e) => Response::error(id, e),
    })
}

fn injection() -> impl Strategy<Value = InjectionRule> {
    prop_oneof![
        (word(), text()).prop_map(|(name, prefix)| InjectionRule::Header { name, prefix }),
        word().prop_map(|name| InjectionRule::Query { name }),
        Just(InjectionRule::Basic),
    ]
}
fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(word(), text(), 0..3)
}
fn vault_store_params() -> impl Strategy<Value = ext::VaultStoreParams> {
    (
        (service(), secret(), string_map(), of(1u64..1_000_000), of(service()), of(credential_type())),
        (of(classification()), of(words()), of(words()), of(text()), of(injection()), of(1u32..=86_400)),
    )
        .prop_map(|((key, value, metadata, ttl, service, credential_type), (classification, scopes, tags, upstream, inject, max_ttl))| {
            ext::VaultStoreParams {
                key,
                value,
                metadata,
                ttl,
                service,
                credential_type,
                classification,
                scopes,
                tags,
                upstream,
                inject,
                max_ttl,
            }
        })
}
fn vault_list_entry() -> impl Strategy<Value = ext::VaultListEntry> {
    (service(), service(), credential_type(), classification(), string_map(), words(), timestamp(), of(timestamp())).prop_map(
        |(key, service, credential_type, classification, metadata, tags, created_at, expires_at)| ext::VaultListEntry {
            key,
            service,
            credential_type,
            classification,
            metadata,
            tags,
            created_at,
            expires_at,
        },
    )
}
fn audit_event() -> impl Strategy<Value = ext::AuditEvent> {
    (
        (any::<u64>(), word(), word(), timestamp(), word(), of(word())),
        (of(service()), of(service()), of(word()), of(text()), of(word()), json_object()),
    )
        .prop_map(|((seq, action, requester, timestamp, decision, policy), (key, service, lease_id, purpose, trace_id, detail))| {
            ext::AuditEvent {
                seq,
                action,
                requester,
                timestamp,
                decision,
                policy,
                key,
                service,
                lease_id,
                purpose,
                trace_id,
                detail: match detail {
                    Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                },
            }
        })
}

// ---------------------------------------------------------------------------------------
// Round trips.

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) -> Result<(), TestCaseError> {
    let text = serde_json::to_string(v).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let back: T = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("decode {text}: {e}")))?;
    prop_assert_eq!(&back, v, "through {}", text);
    // And through serde_json::Value, the path the dispatcher takes.
    let value = serde_json::to_value(v).map_err(|e| TestCaseError::fail(format!("to_value: {e}")))?;
    let back: T = serde_json::from_value(value).map_err(|e| TestCaseError::fail(format!("from_value: {e}")))?;
    prop_assert_eq!(&back, v);
    Ok(())
}

macro_rules! roundtrips {
    ($($name:ident: $strategy:expr;)*) => {
        proptest! {
            $(
                #[test]
                fn $name(v in $strategy) {
                    roundtrip(&v)?;
                }
            )*
        }
    };
}

roundtrips! {
    use_params_roundtrip: use_params();
    use_result_roundtrip: use_result();
    resolve_params_roundtrip: resolve_params();
    resolve_result_roundtrip: resolve_result();
    lease_params_roundtrip: lease_params();
    lease_result_roundtrip: lease_result();
    revoke_params_roundtrip: revoke_params();
    revoke_result_roundtrip: revoke_result();
    list_params_roundtrip: list_params();
    list_result_roundtrip: list_result();
    lease_roundtrip: lease();
    descriptor_roundtrip: descriptor();
    capability_roundtrip: capability();
    error_roundtrip: crp_error();
    material_roundtrip: material();
    request_context_roundtrip: context();
    request_roundtrip: request();
    response_roundtrip: response();
    id_roundtrip: id();
    vault_store_params_roundtrip: vault_store_params();
    vault_store_result_roundtrip: (service(), any::<u32>(), of(timestamp()))
        .prop_map(|(key, version, expires_at)| ext::VaultStoreResult { stored: true, key, version, expires_at });
    vault_retrieve_params_roundtrip: (service(), of(text()))
        .prop_map(|(key, purpose)| ext::VaultRetrieveParams { key, purpose });
    vault_retrieve_result_roundtrip: (service(), secret(), string_map())
        .prop_map(|(key, value, metadata)| ext::VaultRetrieveResult { key, value, metadata });
    vault_delete_params_roundtrip: service().prop_map(|key| ext::VaultDeleteParams { key });
    vault_delete_result_roundtrip: (any::<bool>(), service(), words())
        .prop_map(|(deleted, key, revoked_leases)| ext::VaultDeleteResult { deleted, key, revoked_leases });
    vault_list_params_roundtrip: (of(text()), of(words()), of(1u32..=1000), of(text()))
        .prop_map(|(prefix, tags, limit, cursor)| ext::VaultListParams { prefix, tags, limit, cursor });
    vault_list_result_roundtrip: (vec(vault_list_entry(), 0..3), of(text()))
        .prop_map(|(credentials, cursor)| ext::VaultListResult { credentials, cursor });
    policy_check_params_roundtrip: (service(), word(), of(word()), of(words()), of(any::<u32>()), of(text()))
        .prop_map(|(key, action, requester, scopes, ttl, purpose)| ext::PolicyCheckParams { key, action, requester, scopes, ttl, purpose });
    policy_check_result_roundtrip: (any::<bool>(), word(), of(word()), text())
        .prop_map(|(allowed, outcome, policy, reason)| ext::PolicyCheckResult { allowed, outcome, policy, reason });
    audit_query_params_roundtrip: (of(service()), of(word()), of(word()), of(timestamp()), of(timestamp()), of(1u32..=1000))
        .prop_map(|(key, requester, action, since, until, limit)| ext::AuditQueryParams { key, requester, action, since, until, limit });
    audit_query_result_roundtrip: vec(audit_event(), 0..3).prop_map(|events| ext::AuditQueryResult { events });
    whoami_roundtrip: (word(), words(), "[0-9]\\.[0-9]")
        .prop_map(|(agent, roles, version)| ext::WhoamiResult { agent, roles, version });
}

/// Every generated params value that passes the Rust `validate()` also passes the committed
/// JSON Schema: the two descriptions of a valid request agree.
#[test]
fn valid_params_satisfy_the_committed_schemas() {
    fn check<T: Serialize + Debug>(stem: &str, strategy: impl Strategy<Value = T>, valid: impl Fn(&T) -> bool) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../schemas/{stem}.schema.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let schema: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let validator = jsonschema::draft202012::new(&schema).expect("schema compiles");
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&strategy, |v| {
                if valid(&v) {
                    let json = serde_json::to_value(&v).expect("encodes");
                    let errors: Vec<String> = validator.iter_errors(&json).map(|e| e.to_string()).collect();
                    prop_assert!(errors.is_empty(), "{stem}: {json} passes validate() but not the schema: {errors:?}");
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    check("use-params", use_params(), |p| p.validate().is_ok());
    check("resolve-params", resolve_params(), |p| p.validate().is_ok());
    check("lease-params", lease_params(), |p| p.validate().is_ok());
    check("revoke-params", revoke_params(), |p| p.validate().is_ok());
    check("list-params", list_params(), |p| p.validate().is_ok());
    check("capability", capability(), |c| c.validate().is_ok());
}

// ---------------------------------------------------------------------------------------
// Classification.

const SPEC_ORDER: [Classification; 4] =
    [Classification::Public, Classification::Internal, Classification::Confidential, Classification::Restricted];

fn spec_rank(c: Classification) -> usize {
    SPEC_ORDER.iter().position(|x| *x == c).expect("every label is in the spec order")
}

#[test]
fn classification_sorts_in_the_spec_order() {
    let mut all = vec![
        Classification::Restricted,
        Classification::Public,
        Classification::Confidential,
        Classification::Internal,
    ];
    all.sort();
    assert_eq!(all, SPEC_ORDER);
    let names: Vec<&str> = SPEC_ORDER.iter().map(|c| c.as_str()).collect();
    assert_eq!(names, ["public", "internal", "confidential", "restricted"]);
}

proptest! {
    #[test]
    fn classification_order_is_total_and_matches_the_spec(a in classification(), b in classification(), c in classification()) {
        // Exactly one of <, ==, > and it agrees with the spec's ranks.
        prop_assert_eq!(a.cmp(&b), spec_rank(a).cmp(&spec_rank(b)));
        prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
        prop_assert_eq!(a == b, a.cmp(&b).is_eq());
        if a <= b && b <= c {
            prop_assert!(a <= c);
        }
        // Names round-trip through FromStr and serde alike.
        prop_assert_eq!(a.as_str().parse::<Classification>(), Ok(a));
        prop_assert_eq!(serde_json::to_value(a).ok(), Some(json!(a.as_str())));
    }

    #[test]
    fn unknown_classification_names_are_refused(s in "\\PC{0,12}") {
        let known = ["public", "internal", "confidential", "restricted"].contains(&s.as_str());
        prop_assert_eq!(s.parse::<Classification>().is_ok(), known);
    }
}

// ---------------------------------------------------------------------------------------
// Version negotiation.

/// The rules, written independently of the implementation.
fn expected_version(requested: &str) -> Option<&'static str> {
    let parts: Vec<&str> = requested.trim().split('.').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    if !parts[0].bytes().all(|b| b == b'0') {
        return None; // another major
    }
    match parts[1].trim_start_matches('0') {
        "" => None,      // minor 0: nothing at or below it
        "1" => Some("0.1"),
        _ => Some("0.2"), // lower minor wins
    }
}

fn version_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{1,3}\\.[0-9]{1,3}",
        "0\\.[0-9]{1,30}",
        "[0-9]{1,30}\\.[0-9]{1,30}(\\.[0-9]{1,3})?",
        "[ \t]{0,2}0*[0-3]\\.0*[0-9][ \t]{0,2}",
        "[0-9.a-z-]{0,8}",
    ]
}

proptest! {
    #[test]
    fn negotiate_never_panics_and_follows_the_rules(requested in version_like()) {
        match (version::negotiate(Some(&requested)), expected_version(&requested)) {
            (Ok(v), Some(want)) => prop_assert_eq!(v.as_str(), want),
            (Err(e), None) => {
                prop_assert_eq!(e.code, -33001);
                let supported = e.data.and_then(|d| d.supported);
                prop_assert_eq!(supported, Some(vec!["0.2".to_string(), "0.1".to_string()]));
            }
            (got, want) => prop_assert!(false, "{requested:?}: got {got:?}, rules say {want:?}"),
        }
    }

    #[test]
    fn a_negotiated_version_is_never_newer_than_asked(major in 0u64..3, minor in 0u64..10) {
        if let Ok(v) = version::negotiate(Some(&format!("{major}.{minor}"))) {
            prop_assert_eq!(major, 0);
            prop_assert!(u64::from(v.as_str().as_bytes()[2] - b'0') <= minor);
        }
    }

    #[test]
    fn version_errors_do_not_echo_what_is_not_a_version(prefix in "\\PC{0,8}", suffix in "\\PC{0,8}") {
        let requested = format!("{prefix}CANARY{suffix}");
        let e = version::negotiate(Some(&requested)).expect_err("not a version");
        let json = serde_json::to_string(&e).expect("encodes");
        prop_assert!(!json.contains("CANARY"), "{json}");
    }
}

#[test]
fn absent_version_is_the_newest() {
    assert_eq!(version::negotiate(None).ok(), Some(Version::LATEST));
}

// ---------------------------------------------------------------------------------------
// The dispatcher.

/// Answers every method with a fixed typed result that echoes nothing from the params.
struct Fixed;

fn fixed_lease() -> Lease {
    Lease { id: "lease-fixed".into(), expires_at: "2026-07-17T13:00:00Z".into(), ttl: 60, renewable: true, delegation_depth: Some(0) }
}

#[async_trait]
impl Provider for Fixed {
    fn capability(&self, v: Version) -> Capability {
        Capability { version: v.to_string(), versions: vec![], provider: Some("fixed".into()), features: vec![Feature::Use], conformance: None }
    }
    async fn use_credential(&self, _: &CallContext, _: UseParams) -> Result<UseResult, CrpError> {
        Ok(UseResult {
            lease: fixed_lease(),
            proxy_base_url: "http://127.0.0.1:7700/api/v1/proxy/t/lease-fixed".into(),
            session_token: None,
            service: "fixed/service".into(),
            granted_scopes: vec![],
            credential_descriptor: CredentialDescriptor {
                credential_type: CredentialType::ApiKey,
                brokered: false,
                auto_refresh: false,
                classification: Classification::Internal,
            },
        })
    }
    async fn resolve(&self, _: &CallContext, _: ResolveParams) -> Result<ResolveResult, CrpError> {
        Err(CrpError::policy_denied("export not permitted", None))
    }
    async fn lease(&self, _: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        Ok(match p.action {
            LeaseAction::Renew => LeaseResult::Renewed(LeaseRenewed { lease: fixed_lease(), proxy_base_url: None, credential: None }),
            LeaseAction::Release => LeaseResult::Released(LeaseReleased { released: true, lease_id: "lease-fixed".into() }),
        })
    }
    async fn revoke(&self, _: &CallContext, p: RevokeParams) -> Result<RevokeResult, CrpError> {
        Err(CrpError::lease_not_found(&p.lease_id))
    }
    async fn list(&self, _: &CallContext, _: ListParams) -> Result<ListResult, CrpError> {
        Ok(ListResult { services: vec![], cursor: None })
    }
}

const METHODS: [&str; 9] =
    ["crp/use", "crp/resolve", "crp/lease", "crp/revoke", "crp/list", "x-crp/whoami", "x-crp/vault.store", "rpc.discover", "crp/teleport"];

fn method() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => proptest::sample::select(METHODS.to_vec()).prop_map(Value::from),
        1 => json_value(),
    ]
}
fn params() -> impl Strategy<Value = Option<Value>> {
    of(prop_oneof![
        json_object(),
        json_value(),
        use_params().prop_map(|p| serde_json::to_value(p).unwrap_or_default()),
        lease_params().prop_map(|p| serde_json::to_value(p).unwrap_or_default()),
        revoke_params().prop_map(|p| serde_json::to_value(p).unwrap_or_default()),
    ])
}
fn message() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just(Some(json!("2.0"))), 1 => of(json_value())],
        prop_oneof![Just(None), Just(Some(Value::Null)), any::<i64>().prop_map(|n| Some(json!(n))), text().prop_map(|s| Some(json!(s))), json_value().prop_map(Some)],
        of(method()),
        params(),
    )
        .prop_map(|(jsonrpc, id, method, params)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [("jsonrpc", jsonrpc), ("id", id), ("method", method), ("params", params)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}
fn incoming() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        message().prop_map(|v| v.to_string().into_bytes()),
        vec(prop_oneof![4 => message(), 1 => json_value()], 0..6).prop_map(|v| Value::Array(v).to_string().into_bytes()),
        (message(), 0usize..40).prop_map(|(m, cut)| {
            let mut b = m.to_string().into_bytes();
            b.truncate(b.len().saturating_sub(cut));
            b
        }),
    ]
}

/// A notification: a valid request without an `id` member.
fn is_notification(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    !o.contains_key("id")
        && o.get("jsonrpc") == Some(&json!("2.0"))
        && o.get("method").is_some_and(Value::is_string)
        && o.get("params").is_none_or(|p| p.is_object() || p.is_array())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

fn check_response(r: &Value) -> Result<(), TestCaseError> {
    let parsed: Result<Response, _> = serde_json::from_value(r.clone());
    prop_assert!(parsed.is_ok(), "not a JSON-RPC 2.0 response: {r} ({:?})", parsed.err());
    if let Some(e) = r.get("error") {
        let code = e["code"].as_i64().unwrap_or(0);
        prop_assert!(ErrorCode::from_code(code).is_some(), "unregistered code in {r}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn dispatcher_answers_every_request_and_no_notification(bytes in incoming(), v01 in any::<bool>()) {
        let rt = runtime();
        let d = Dispatcher::new(Arc::new(Fixed));
        let ctx = CallContext::new("prop", Transport::InProcess)
            .with_version(if v01 { Version::V0_1 } else { Version::V0_2 });
        let out = rt.block_on(d.handle_bytes(&ctx, &bytes));
        let input: Result<Value, _> = serde_json::from_slice(&bytes);
        let expect_answer = match &input {
            Err(_) => true,
            Ok(Value::Array(items)) if items.is_empty() || items.len() > crp_core::dispatch::MAX_BATCH => true,
            Ok(Value::Array(items)) => items.iter().any(|i| !is_notification(i)),
            Ok(v) => !is_notification(v),
        };
        prop_assert_eq!(out.is_some(), expect_answer, "input {:?} gave {:?}", String::from_utf8_lossy(&bytes), out);
        let Some(text) = out else { return Ok(()) };
        let answer: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("answer is not JSON: {e}: {text}")))?;
        match (&input, &answer) {
            (Ok(Value::Array(items)), Value::Array(responses)) => {
                let wanted = items.iter().filter(|i| !is_notification(i)).count();
                prop_assert_eq!(responses.len(), wanted, "{}", text);
                for r in responses {
                    check_response(r)?;
                }
            }
            (_, Value::Array(_)) => prop_assert!(false, "a batch answer to a non-batch: {text}"),
            (input, single) => {
                check_response(single)?;
                // A readable request id comes back unchanged.
                if let Ok(Value::Object(o)) = input
                    && let Some(id @ (Value::String(_) | Value::Number(_))) = o.get("id")
                {
                    prop_assert_eq!(single.get("id"), Some(id));
                }
            }
        }
    }

    #[test]
    fn dispatcher_never_echoes_a_canary_from_params(
        method in proptest::sample::select(METHODS[..7].to_vec()),
        params in json_value(),
        key in "[a-zA-Z]{0,4}",
        v01 in any::<bool>(),
    ) {
        // Put the canary into the params both as a key and as every string value.
        fn plant(v: Value) -> Value {
            match v {
                Value::String(s) => Value::String(format!("{s}sk-CANARY-{s}")),
                Value::Array(a) => Value::Array(a.into_iter().map(plant).collect()),
                Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (format!("{k}CANARY"), plant(v))).collect()),
                other => other,
            }
        }
        let mut planted = plant(params);
        if let Value::Object(o) = &mut planted {
            o.insert(format!("{key}sk-CANARY"), json!("sk-CANARY"));
        }
        let msg = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": planted});
        let rt = runtime();
        let d = Dispatcher::new(Arc::new(Fixed));
        let ctx = CallContext::new("prop", Transport::InProcess)
            .with_version(if v01 { Version::V0_1 } else { Version::V0_2 });
        let text = rt.block_on(d.handle_bytes(&ctx, msg.to_string().as_bytes())).expect("a request is answered");
        prop_assert!(!text.contains("CANARY"), "{msg} -> {text}");
    }
}

#[test]
fn an_oversized_batch_is_refused_whole() {
    let item = json!({"jsonrpc": "2.0", "id": 1, "method": "crp/list"});
    let batch = Value::Array(vec![item; crp_core::dispatch::MAX_BATCH + 1]);
    let rt = runtime();
    let d = Dispatcher::new(Arc::new(Fixed));
    let ctx = CallContext::new("prop", Transport::InProcess);
    let text = rt.block_on(d.handle_bytes(&ctx, batch.to_string().as_bytes())).expect("answered");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["error"]["code"], -32600, "{text}");
    assert_eq!(v["id"], Value::Null);
}

/// Answers `crp/use` only once every one of `n` calls has arrived: a dispatcher that ran a
/// batch's members one after the other would never answer.
struct Gathering(tokio::sync::Barrier);

#[async_trait]
impl Provider for Gathering {
    fn capability(&self, v: Version) -> Capability {
        Capability { version: v.to_string(), versions: vec![], provider: None, features: vec![Feature::Use], conformance: None }
    }
    async fn use_credential(&self, _: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
        self.0.wait().await;
        Err(CrpError::service_not_found(&p.service))
    }
}

#[test]
fn a_batch_runs_its_members_concurrently_and_answers_in_its_order() {
    const N: usize = 8;
    let mut batch: Vec<Value> =
        (0..N).map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "crp/use", "params": {"service": format!("s{i}")}})).collect();
    // A notification among them is run too (it holds a place at the barrier) but not answered.
    batch.insert(3, json!({"jsonrpc": "2.0", "method": "crp/use", "params": {"service": "quiet"}}));
    let d = Dispatcher::new(Arc::new(Gathering(tokio::sync::Barrier::new(N + 1))));
    let ctx = CallContext::new("batch", Transport::InProcess);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let text = rt
        .block_on(async {
            let message = Value::Array(batch).to_string();
            tokio::time::timeout(std::time::Duration::from_secs(10), d.handle_bytes(&ctx, message.as_bytes())).await
        })
        .expect("the batch's members ran concurrently (one after the other they wait forever)")
        .expect("answered");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    let items = v.as_array().expect("an array");
    assert_eq!(items.len(), N, "{text}");
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["id"], i, "answers keep the batch's order: {text}");
        assert_eq!(item["error"]["code"], -33002, "{text}");
    }
}

// ---------------------------------------------------------------------------------------
// Secrets in Debug output.

proptest! {
    #[test]
    fn secret_debug_never_shows_the_value(value in "\\PC{24,64}", header in "[a-z]{1,8}") {
        let s = SecretValue::new(value.clone());
        let debug = format!("{s:?} {s:#?}");
        prop_assert!(!debug.contains(&value), "{debug}");
        prop_assert_eq!(s.expose(), value.as_str());

        let m = CredentialMaterial::ApiKey { key: s.clone(), header: header.clone(), prefix: None };
        let shown = format!("{m:?} {m:#?}");
        prop_assert!(!shown.contains(&value));
        let m = CredentialMaterial::Custom {
            custom_type: header.clone(),
            data: BTreeMap::from([("k".to_string(), s.clone())]),
        };
        let shown = format!("{m:?}");
        prop_assert!(!shown.contains(&value));
        let r = ext::VaultRetrieveResult { key: header.clone(), value: s.clone(), metadata: BTreeMap::new() };
        let shown = format!("{r:?}");
        prop_assert!(!shown.contains(&value));
        let p = ext::VaultStoreParams {
            key: header, value: s, metadata: BTreeMap::new(), ttl: None, service: None, credential_type: None,
            classification: None, scopes: None, tags: None, upstream: None, inject: None, max_ttl: None,
        };
        let shown = format!("{p:?}");
        prop_assert!(!shown.contains(&value));
    }
}

// ---------------------------------------------------------------------------------------
// The serde-message redactor, against serde's own message templates with hostile values.

proptest! {
    #[test]
    fn redaction_removes_any_value_from_serde_messages(
        before in "\\PC{0,8}",
        after in "[\\PC`\"\\\\]{0,8}",
        expected in prop_oneof![Just("u32"), Just("`renew` or `release`"), Just("one of `service`, `scopes`"), Just("a string")],
    ) {
        let s = format!("{before}CANARY{after}");
        let messages = [
            format!("invalid type: string {s:?}, expected {expected}"),
            format!("invalid value: string {s:?}, expected {expected}"),
            format!("unknown variant `{s}`, expected {expected}"),
            format!("unknown field `{s}`, expected {expected}"),
            format!("unknown field `{s}`, there are no fields"),
            format!("invalid type: map, expected {expected}"),
            s.clone(),
        ];
        for m in messages {
            let out = crp_core::dispatch::redact_serde_message(&m);
            prop_assert!(!out.contains("CANARY"), "{m:?} -> {out:?}");
        }
    }
}

#[test]
fn redaction_keeps_what_helps_the_caller() {
    use crp_core::dispatch::redact_serde_message as r;
    assert_eq!(r("missing field `service`"), "missing field `service`");
    assert_eq!(r("invalid type: string \"x\", expected u32"), "invalid type: string, expected u32");
    assert_eq!(r("unknown variant `x`, expected `renew` or `release`"), "unknown variant, expected `renew` or `release`");
    assert_eq!(r("invalid type: map, expected a string"), "invalid type: map, expected a string");
}
