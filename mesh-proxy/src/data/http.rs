//! HTTP/1.1: one hyper server per downstream connection, a route decision per request, and the
//! request forwarded on a pooled keep-alive connection to the chosen endpoint.
//!
//! The config snapshot is loaded per request, so a keep-alive connection follows reloads and gets
//! the configured split request by request. Envoy's limits apply: 60 KiB of request headers and 100
//! headers (431 beyond), 400 for malformed requests (hyper answers both and closes).
//!
//! - [`server`]: the downstream connection and the route decision per request;
//! - [`forward`]: the request sent upstream and its response headers awaited;
//! - [`retry`]: a rule's retry policy, a loop of tries around [`forward`]'s one;
//! - [`fault`]: a rule's fault injection (delay, abort) before the request is forwarded;
//! - [`headers`]: what changes between the two hops (hop-by-hop headers, request form);
//! - [`body`]: the response body, local or streamed from upstream, which returns the upstream
//!   connection to its pool when it ends;
//! - [`upgrade`]: `Upgrade` (WebSocket) and `CONNECT`: the handshake routed as a request, then
//!   both connections joined as a TCP session;
//! - [`access_log`]: the line written per request.

pub mod access_log;
pub mod body;
pub mod fault;
pub mod forward;
pub mod headers;
pub mod retry;
pub mod server;
pub mod upgrade;

pub use server::{serve, ConnCtx};
