//! mesh-proxy: the mesh's sidecar proxy. Connections that mesh-init's rules redirect to the proxy
//! are routed by Envoy's four objects: listeners (where they arrive), routes (what the application
//! dialled → weighted clusters), clusters (equivalent endpoints and how to balance them) and
//! endpoints (`ip:port`).
//!
//! Layout:
//! - [`data`]: the data plane, every accepted connection from the listening socket to the
//!   upstream (accept, dispatch, detect, http, tcp, inbound, route table, clusters, balancing).
//! - [`control`]: applying updates from the file (inotify, SIGHUP) and from discovery (polling)
//!   and swapping the snapshot the data plane reads.
//! - [`admin`]: the operator's API, and the readiness port (`GET /ready` alone, for the kubelet).
//! - [`config`]: the file format and its validation; [`metrics`], [`logging`], [`drain`]: shared
//!   by the three.
//!
//! Threads: the data plane (accept loops, connections) runs on a multi-thread runtime of
//! `--workers` threads; admin, reloads and discovery on a separate current-thread runtime.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod data;
pub mod drain;
pub mod logging;
pub mod metrics;
pub mod parse;
