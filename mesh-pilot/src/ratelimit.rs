//! `policy.mesh-init.io/v1alpha1` `LocalRateLimit`: the one resource of our own, for what Istio's
//! traffic API has no field for (Istio users write an EnvoyFilter with Envoy's `local_ratelimit`).
//! A token bucket on the routes to a service, as Envoy's local rate limit filter keeps it:
//!
//! ```yaml
//! apiVersion: policy.mesh-init.io/v1alpha1
//! kind: LocalRateLimit
//! metadata: { name: reviews, namespace: default }
//! spec:
//!   host: reviews            # resolved like a VirtualService host
//!   port: 9080               # optional: only this service port
//!   maxTokens: 100           # bucket size (burst)
//!   tokensPerFill: 100       # default: maxTokens
//!   fillInterval: 1s
//! ```
//!
//! Unlike Istio's kinds, ours is checked strictly: an unknown field is an error with its line.
//! Its CRD (`deploy/mesh-pilot/crds.yaml`) carries the same schema.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRateLimit {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<u32>,
    pub fill_interval: String,
}
