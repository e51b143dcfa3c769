//! Platform adapters: where objects come from. Both deliver [`crate::model::Change`]s to the
//! same model; neither knows anything about routing.
//!
//! - [`files`]: a directory of Kubernetes-format YAML, watched (what runs locally and in tests).
//! - [`kube`]: a Kubernetes API server, through kube-rs watchers.

pub mod files;
pub mod kube;
