//! mesh-proxy: the mesh's sidecar proxy. Connections that mesh-init's rules redirect to the proxy
//! are routed by Envoy's four objects: listeners (where they arrive), routes (what the application
//! dialled → weighted clusters), clusters (equivalent endpoints and how to balance them) and
//! endpoints (`ip:port`).
//!
//! Layout, in the order a connection meets it:
//! - [`listener`]: listening sockets and accept loops, kept across reloads when unchanged.
//! - [`orig_dst`]: where a redirected connection was going (`SO_ORIGINAL_DST`).
//! - [`dispatch`]: the decision per connection (inbound, routed, detect, passthrough, refused), as data.
//! - [`proxy`]: carries that decision out; [`inbound`] connects to the local app from 127.0.0.6.
//! - [`detect`]: HTTP/1 or opaque, from the first bytes, with a bounded wait.
//! - [`http`]: hyper server per downstream connection, routing per request, upstream keep-alive pool.
//! - [`tcp`]: connecting and copying bytes with half-close.
//! - [`route`], [`cluster`], [`balance`]: the route table, clusters with their endpoints, and the
//!   load-balancing choices.
//! - [`config`]: the file format and its validation; [`snapshot`]: a validated config plus the
//!   runtime objects built from it, swapped atomically.
//! - [`reload`]: applying updates from the file (inotify, SIGHUP) and [`discovery`] (polling).
//! - [`admin`], [`readiness`] (`GET /ready` alone, for the kubelet), [`metrics`], [`logging`],
//!   [`drain`]: the operator's side.
//!
//! Threads: the data plane (accept loops, connections) runs on a multi-thread runtime of
//! `--workers` threads; admin, reloads and discovery on a separate current-thread runtime.

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod dispatch;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod orig_dst;
pub mod proxy;
pub mod readiness;
pub mod reload;
pub mod route;
pub mod snapshot;
pub mod tcp;
