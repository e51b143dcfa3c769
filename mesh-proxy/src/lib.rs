//! mesh-proxy: the mesh's sidecar proxy. Connections that mesh-init's rules redirect to the proxy
//! are routed by Envoy's four objects: listeners (where they arrive), routes (what the application
//! dialled → weighted clusters), clusters (equivalent endpoints and how to balance them) and
//! endpoints (`ip:port`).
//!
//! Layout, each layer using only those below it:
//! - [`app`]: a whole proxy: [`app::build`] binds everything and returns [`app::Bound`] (the bound
//!   addresses, so a config may say port 0), [`app::Bound::wait_termination`] drains on SIGTERM.
//!   `main.rs` is the command line around it; tests start proxies in-process with it.
//! - [`admin`]: the operator's API, and the readiness port (`GET /ready` alone, for the kubelet).
//! - [`control`]: applying updates from the file (inotify, SIGHUP) and from discovery (polling):
//!   validate, bind new listeners, build a snapshot, swap it in; the NACK when any step fails.
//! - [`data`]: the data plane, every accepted connection from the listening socket to the
//!   upstream (accept, dispatch, detect, http, tcp, inbound, route table, clusters, pool,
//!   balancing). It reads the snapshot it is handed and never imports the control side.
//! - [`dns`]: the DNS proxy (Istio's agent's, port 15053): the config's names answered, the rest
//!   forwarded to the pod's nameservers and cached; on the data plane's runtime, when asked for.
//! - [`config`]: the file in two parts — the bootstrap, fixed at start, and the routing, which
//!   updates replace — and its validation; [`parse`]: the grammars of durations, addresses and
//!   authorities, for the config and the request path alike.
//! - [`metrics`], [`logging`], [`drain`]: written by the data and control sides, read by admin.
//!
//! Threads: the data plane (accept loops, connections) runs on a runtime of `--workers` threads
//! (current-thread for one); the admin API and the readiness port on a one-thread runtime of
//! their own, so they answer whatever else is happening; reloads and discovery on the caller's
//! runtime, which `main` makes a separate current-thread one (config builds on its blocking
//! threads).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod data;
pub mod dns;
pub mod drain;
pub mod logging;
pub mod metrics;
pub mod parse;
