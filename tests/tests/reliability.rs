//! The reliability suite (issue 12): each failure found by trying mesh-proxy as a hostile or
//! careless user would, reproduced with real processes — the proxy binary as UID 1337 behind
//! mesh-init's iptables rules in a pod namespace, python, curl and raw-socket clients and
//! servers — and the behaviour that fixed it.
//!
//! One module per failure of the issue: [`config_file`] (1, 2), [`pool`] (3), [`loops`] (4), [`drain`] (5), [`scale`] (6), [`timeouts`] (7), [`http`] (8, 9), [`admin`] (10, 11).

#[path = "reliability/admin.rs"]
mod admin;
#[path = "reliability/config_file.rs"]
mod config_file;
#[path = "reliability/drain.rs"]
mod drain;
#[path = "reliability/http.rs"]
mod http;
#[path = "reliability/lab.rs"]
mod lab;
#[path = "reliability/loops.rs"]
mod loops;
#[path = "reliability/pool.rs"]
mod pool;
#[path = "reliability/scale.rs"]
mod scale;
#[path = "reliability/timeouts.rs"]
mod timeouts;
