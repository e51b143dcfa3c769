//! The reliability suite (issue 12): each failure found by trying mesh-proxy as a hostile or
//! careless user would, reproduced with real processes — the proxy binary as UID 1337 behind
//! mesh-init's iptables rules in a pod namespace, python, curl and raw-socket clients and
//! servers — and the behaviour that fixed it.
//!
//! One module per failure of the issue: [`pool`] (3).

#[path = "reliability/lab.rs"]
mod lab;
#[path = "reliability/pool.rs"]
mod pool;
