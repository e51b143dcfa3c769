//! mesh-pilot: the mesh's control plane. It watches a platform (a Kubernetes API server, or a
//! directory of Kubernetes-format YAML), takes the operator's rules in Istio's traffic API, and
//! serves every proxy its listeners, routes, clusters and endpoints over mesh-proxy's discovery
//! API, one scope per namespace.
//!
//! Layout, in the order an object travels:
//! - [`adapter`]: platform adapters ([`adapter::files`], [`adapter::kube`]) turning what they see
//!   into [`model::Change`]s.
//! - [`yaml`] (documents with the line of every field) and [`resource`] (the kinds we read:
//!   Kubernetes' via k8s-openapi, Istio's in [`istio`], ours in [`ratelimit`]).
//! - [`model`]: the one store of objects and the service registry derived from it.
//! - [`translate`]: Istio's API and the registry → mesh-proxy's objects per namespace scope.
//! - [`analysis`]: findings with resource, field and line (`mesh-pilot analyze`, `/debug/analyze`).

#![forbid(unsafe_code)]

pub mod adapter;
pub mod analysis;
pub mod app;
pub mod istio;
pub mod metrics;
pub mod model;
pub mod push;
pub mod ratelimit;
pub mod resource;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod translate;
pub mod yaml;
