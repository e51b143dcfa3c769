//! The objects mesh-pilot reads, whichever adapter delivered them: Kubernetes' `Service`,
//! `EndpointSlice` and `Pod` (k8s-openapi's types), Istio's traffic kinds ([`crate::istio`]) and our
//! own [`crate::ratelimit::LocalRateLimit`].
//!
//! Both adapters hand a JSON value to [`parse`]: the files adapter from YAML ([`crate::yaml`]), the
//! Kubernetes adapter from a watch. Foreign kinds (a `Deployment` in the same file) are skipped,
//! and so are unknown fields of foreign kinds (`status`, `managedFields`): files written by
//! `kubectl get -o yaml` or for Istio load as they are. Fields of Istio's specs that mesh-pilot
//! does not translate are kept (each struct's `other`) so the translation can report them.

use std::{collections::BTreeMap, fmt, sync::Arc};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::{istio, ratelimit, yaml::Lines};

/// Istio's traffic API group, all three versions of which carry the same schema for our kinds.
pub const ISTIO_GROUP: &str = "networking.istio.io";
pub const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// Our own API group (the local rate limits Istio's API lacks).
pub const OWN_GROUP: &str = "policy.mesh-init.io";
pub const OWN_VERSION: &str = "v1alpha1";
/// Where an object without a namespace lives, as `kubectl apply` would put it.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    Sidecar,
    LocalRateLimit,
}

impl Kind {
    /// Changes to these kinds only move endpoints (what subsets select, which addresses are
    /// ready): they are pushed at once instead of waiting for the config debounce.
    pub fn is_endpoint_kind(self) -> bool {
        matches!(self, Kind::EndpointSlice | Kind::Pod | Kind::WorkloadEntry)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An object's identity: adding an object with the same key replaces the previous one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Where an object came from, to name it in findings: a file and the line of each field, or the
/// Kubernetes API (no lines).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// A file path, or `kubernetes`.
    pub source: String,
    pub lines: Option<Arc<Lines>>,
    /// The object's path inside its document (`items[2].` for an object of a `List`).
    pub prefix: String,
}

impl Origin {
    pub fn kubernetes() -> Arc<Origin> {
        Arc::new(Origin { source: "kubernetes".into(), lines: None, prefix: String::new() })
    }

    /// The line of a field of this object (`spec.http[0].route`), when it came from a file.
    pub fn line(&self, field: &str) -> Option<usize> {
        self.lines.as_ref().map(|l| l.line(&format!("{}{field}", self.prefix)))
    }
}

/// What every object has: identity, age (Istio's tie-breaker between conflicting rules), labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub key: Key,
    /// `metadata.creationTimestamp` as written (RFC 3339 sorts as text); absent sorts first.
    pub created: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub origin: Arc<Origin>,
}

impl Meta {
    fn new(kind: Kind, meta: &ObjectMeta, origin: Arc<Origin>) -> Meta {
        let namespace = meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        Meta {
            key: Key { kind, namespace, name: meta.name.clone().unwrap_or_default() },
            created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            origin,
        }
    }
}

/// A parsed object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub meta: Meta,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Service(Box<core::ServiceSpec>),
    EndpointSlice(Box<discovery::EndpointSlice>),
    Pod(Box<core::Pod>),
    VirtualService(Box<istio::VirtualService>),
    DestinationRule(Box<istio::DestinationRule>),
    ServiceEntry(Box<istio::ServiceEntry>),
    WorkloadEntry(Box<istio::WorkloadEntry>),
    Sidecar(Box<istio::Sidecar>),
    LocalRateLimit(Box<ratelimit::LocalRateLimit>),
}

impl Object {
    /// The object as `/debug/configz` shows it: identity, where it came from, what it says.
    pub fn to_json(&self) -> Value {
        let body = match &self.body {
            Body::Service(s) => serde_json::to_value(s),
            Body::EndpointSlice(s) => serde_json::to_value(s),
            Body::Pod(p) => serde_json::to_value(p),
            Body::VirtualService(s) => serde_json::to_value(s),
            Body::DestinationRule(s) => serde_json::to_value(s),
            Body::ServiceEntry(s) => serde_json::to_value(s),
            Body::WorkloadEntry(s) => serde_json::to_value(s),
            Body::Sidecar(s) => serde_json::to_value(s),
            Body::LocalRateLimit(s) => serde_json::to_value(s),
        };
        serde_json::json!({
            "kind": self.meta.key.kind,
            "namespace": self.meta.key.namespace,
            "name": self.meta.key.name,
            "source": self.meta.origin.source,
            "spec": body.unwrap_or(Value::Null),
        })
    }
}

/// An object that is one of ours (by apiVersion and kind) but does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {resource}: {field}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ParseError {
    /// The file, or `kubernetes`.
    pub file: String,
    pub line: Option<usize>,
    /// `Kind namespace/name` as far as it could be read.
    pub resource: String,
    pub field: String,
    pub reason: String,
}

/// The top level of an Istio-format or own-format object; other keys (`status`) are ignored.
#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: T,
}

/// Parses one object. `Ok(None)` for a kind mesh-pilot does not read. A `List` (as `kubectl get
/// -o yaml` writes several objects) yields its items.
pub fn parse(value: Value, origin: &Arc<Origin>) -> Vec<Result<Object, ParseError>> {
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    if api_version == "v1" && kind == "List" {
        let Value::Object(mut map) = value else { return Vec::new() };
        let items = match map.remove("items") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        return items
            .into_iter()
            .enumerate()
            .flat_map(|(i, item)| {
                let o = Arc::new(Origin { prefix: format!("{}items[{i}].", origin.prefix), ..(**origin).clone() });
                parse(item, &o)
            })
            .collect();
    }
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version.as_str()));
    let result = match (group, version, kind.as_str()) {
        ("", "v1", "Service") => typed::<core::Service>(value, Kind::Service, origin)
            .map(|(meta, s)| Object { meta, body: Body::Service(Box::new(s.spec.unwrap_or_default())) }),
        ("discovery.k8s.io", "v1", "EndpointSlice") => {
            typed::<discovery::EndpointSlice>(value, Kind::EndpointSlice, origin)
                .map(|(meta, s)| Object { meta, body: Body::EndpointSlice(Box::new(s)) })
        }
        ("", "v1", "Pod") => {
            typed::<core::Pod>(value, Kind::Pod, origin).map(|(meta, p)| Object { meta, body: Body::Pod(Box::new(p)) })
        }
        (ISTIO_GROUP, v, k) if ISTIO_VERSIONS.contains(&v) => match k {
            "VirtualService" => spec(value, Kind::VirtualService, origin, |s| Body::VirtualService(Box::new(s))),
            "DestinationRule" => spec(value, Kind::DestinationRule, origin, |s| Body::DestinationRule(Box::new(s))),
            "ServiceEntry" => spec(value, Kind::ServiceEntry, origin, |s| Body::ServiceEntry(Box::new(s))),
            "WorkloadEntry" => spec(value, Kind::WorkloadEntry, origin, |s| Body::WorkloadEntry(Box::new(s))),
            "Sidecar" => spec(value, Kind::Sidecar, origin, |s| Body::Sidecar(Box::new(s))),
            other => Err(unsupported(&value, origin, &api_version, other)),
        },
        (ISTIO_GROUP, _, k) => Err(unsupported(&value, origin, &api_version, k)),
        (OWN_GROUP, OWN_VERSION, "LocalRateLimit") => {
            spec(value, Kind::LocalRateLimit, origin, |s| Body::LocalRateLimit(Box::new(s)))
        }
        (OWN_GROUP, _, k) => Err(unsupported(&value, origin, &api_version, k)),
        _ => return Vec::new(),
    };
    vec![result]
}

fn unsupported(value: &Value, origin: &Origin, api_version: &str, kind: &str) -> ParseError {
    let reason = if api_version.starts_with(OWN_GROUP) {
        format!("{api_version} {kind} is not a kind of ours: expected {OWN_GROUP}/{OWN_VERSION} LocalRateLimit")
    } else {
        format!(
            "{api_version} {kind} is not supported: mesh-pilot reads VirtualService, DestinationRule, ServiceEntry, \
             WorkloadEntry and Sidecar of {ISTIO_GROUP}/{{v1,v1beta1,v1alpha3}}"
        )
    };
    error(value, origin, "kind", reason)
}

fn error(value: &Value, origin: &Origin, field: &str, reason: String) -> ParseError {
    let name = |k: &str| value.pointer(&format!("/metadata/{k}")).and_then(Value::as_str).map(str::to_string);
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("object");
    let resource = format!(
        "{kind} {}/{}",
        name("namespace").unwrap_or(DEFAULT_NAMESPACE.into()),
        name("name").unwrap_or_default()
    );
    ParseError { file: origin.source.clone(), line: origin.line(field), resource, field: field.to_string(), reason }
}

/// Deserializes with the path of the field that failed, which then gives its line.
fn deserialize<T: DeserializeOwned>(value: &Value, origin: &Origin) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        error(value, origin, &field, e.into_inner().to_string())
    })
}

fn typed<T: DeserializeOwned + k8s_openapi::Metadata<Ty = ObjectMeta>>(
    value: Value,
    kind: Kind,
    origin: &Arc<Origin>,
) -> Result<(Meta, T), ParseError> {
    let obj: T = deserialize(&value, origin)?;
    let meta = Meta::new(kind, obj.metadata(), origin.clone());
    check_name(&meta, &value, origin)?;
    Ok((meta, obj))
}

fn spec<T: DeserializeOwned>(
    value: Value,
    kind: Kind,
    origin: &Arc<Origin>,
    wrap: impl FnOnce(T) -> Body,
) -> Result<Object, ParseError> {
    let env: Envelope<T> = deserialize(&value, origin)?;
    let meta = Meta::new(kind, &env.metadata, origin.clone());
    check_name(&meta, &value, origin)?;
    Ok(Object { meta, body: wrap(env.spec) })
}

fn check_name(meta: &Meta, value: &Value, origin: &Origin) -> Result<(), ParseError> {
    if meta.key.name.is_empty() {
        return Err(error(value, origin, "metadata.name", "every object needs a name".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml;

    fn parse_text(text: &str) -> Vec<Result<Object, ParseError>> {
        yaml::documents("t.yaml", text)
            .unwrap()
            .into_iter()
            .flat_map(|d| {
                let origin =
                    Arc::new(Origin { source: "t.yaml".into(), lines: Some(Arc::new(d.lines)), prefix: String::new() });
                parse(d.value, &origin)
            })
            .collect()
    }

    #[test]
    fn kubectl_output_with_status_and_managed_fields_loads() {
        let objs = parse_text(
            "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: reviews
    namespace: default
    creationTimestamp: \"2024-01-01T00:00:00Z\"
    managedFields: [{manager: kubectl}]
    resourceVersion: \"123\"
  spec:
    clusterIP: 10.96.0.20
    ports: [{name: http, port: 9080, protocol: TCP, targetPort: 9080}]
    selector: {app: reviews}
  status: {loadBalancer: {}}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: reviews-v1}
",
        );
        assert_eq!(objs.len(), 1);
        let o = objs[0].as_ref().unwrap();
        assert_eq!(o.meta.key.to_string(), "Service default/reviews");
        assert_eq!(o.meta.created.as_deref(), Some("2024-01-01T00:00:00Z"));
        assert_eq!(o.meta.origin.line("spec.clusterIP"), Some(13));
    }

    #[test]
    fn our_kind_is_checked_and_named_with_field_and_line() {
        let objs = parse_text(
            "\
apiVersion: policy.mesh-init.io/v1alpha1
kind: LocalRateLimit
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  maxTokens: 10
  fillInterval: 1s
  tokns: 3
",
        );
        let e = objs[0].as_ref().unwrap_err();
        assert_eq!(e.resource, "LocalRateLimit default/reviews");
        assert!(e.reason.contains("unknown field `tokns`"), "{e}");
        assert_eq!(e.line, Some(8), "{e}");
    }

    #[test]
    fn unsupported_istio_kind_is_an_error_with_its_line() {
        let objs = parse_text("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n");
        let e = objs[0].as_ref().unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("kind", Some(2)));
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let objs = parse_text(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: reviews\n",
        );
        let e = objs[0].as_ref().unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("spec.hosts", Some(5)), "{e}");
    }
}
