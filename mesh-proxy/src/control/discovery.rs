//! The dynamic source: `discovery.url` + `/v1/listeners`, `/v1/routes`, `/v1/clusters` and
//! `/v1/endpoints`, each answering `{"version_info": "...", "resources": [...]}` with the same
//! objects as the file. A type the server answers 404 for is taken from the file.
//!
//! Two kinds of server are spoken to, told apart by their answers:
//! - **A plain one** (python's `http.server` over a directory): all four are fetched every
//!   `poll_interval`.
//! - **mesh-pilot** (its answers name the snapshot they come from, [`headers::SNAPSHOT`]): the
//!   endpoints request waits for a change (`Prefer: wait=30`, a long poll) and may be answered
//!   with only the clusters whose endpoints changed ([`headers::DELTA`]); the other three are then
//!   fetched only when their version in the new snapshot differs from the one held, pinned to that
//!   snapshot so a poll's four answers always belong together, and unchanged answers are `304`s
//!   (`If-None-Match`). A change reaches the proxy as soon as mesh-pilot has it, without polling.
//!
//! Every request says who the proxy is ([`headers::NODE`]: `discovery.node`, default
//! `$POD_NAME.$POD_NAMESPACE`) and how its last update went: the versions it applied
//! ([`headers::APPLIED`]) and, when it refused the last one, those versions and why
//! ([`headers::REJECTED`], [`headers::ERROR`]) — Envoy's ACK and NACK, which `mesh-pilot status`
//! shows. One keep-alive connection carries the requests.
//!
//! A poll in which any type could not be fetched or parsed as JSON changes nothing (counted in
//! `mesh_proxy_discovery_fetch_errors_total`); a poll whose answers parse but do not validate is a
//! rejected update.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::{
    config::{self, Discovery, DiscoveryResponse, EndpointsDelta, RawEndpoints},
    control::{Control, Discovered, Outcome},
};

/// The discovery protocol's headers beyond HTTP's own (`ETag`, `If-None-Match`, `Prefer`).
pub mod headers {
    /// Answer: the snapshot the answer comes from, as its four versions (`listeners routes
    /// clusters endpoints`). Request without `Prefer: wait`: answer from that snapshot (409 when
    /// it is gone). Request with it: wait until the scope has another snapshot.
    pub const SNAPSHOT: &str = "x-mesh-snapshot";
    /// Request `1`: an endpoints answer may hold only the clusters changed since the
    /// `If-None-Match` version. Answer: that version (the body is then an [`EndpointsDelta`]).
    ///
    /// [`EndpointsDelta`]: crate::config::EndpointsDelta
    pub const DELTA: &str = "x-mesh-delta";
    /// Request: who the proxy is (`name.namespace`).
    pub const NODE: &str = "x-mesh-node";
    /// Request: the versions in force, `listeners routes clusters endpoints`, `-` for a type not
    /// taken from discovery.
    pub const APPLIED: &str = "x-mesh-applied";
    /// Request: the versions of the last update, which was refused.
    pub const REJECTED: &str = "x-mesh-rejected";
    /// Request: why it was refused.
    pub const ERROR: &str = "x-mesh-error";
}

/// Answers larger than this are refused (a config is kilobytes; this bounds a broken server).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long one fetch may take (beyond a long poll's wait).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a long poll asks the server to hold it.
const LONG_POLL: Duration = Duration::from_secs(30);
/// The longest error reason sent back to the server.
const MAX_ERROR_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error(transparent)]
    Parse(#[from] config::Error),
    /// The snapshot a poll was pinned to is gone: start the poll again.
    #[error("{url}: the snapshot this poll began with is gone")]
    Gone { url: String },
    /// An endpoints delta for a version this proxy does not hold: ask for everything.
    #[error("{url}: a delta from {since}, which this proxy does not hold")]
    Delta { url: String, since: String },
}

fn http_err(url: &str, reason: impl std::fmt::Display) -> FetchError {
    FetchError::Http { url: url.to_string(), reason: reason.to_string() }
}

/// This proxy's name for the server: `discovery.node`, else `$POD_NAME.$POD_NAMESPACE` (the
/// injected sidecar has both from the downward API), else `$POD_NAME`, else none.
pub fn node_name(discovery: &Discovery) -> Option<String> {
    if let Some(n) = &discovery.node {
        return Some(n.clone());
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("POD_NAME"), var("POD_NAMESPACE")) {
        (Some(n), Some(ns)) => Some(format!("{n}.{ns}")),
        (n, _) => n,
    }
}

/// One keep-alive connection to the server, made again when it closes (a plain server may
/// close after every answer).
struct Conn {
    authority: String,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    async fn send(
        &mut self,
        url: &str,
        req: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
        let usable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let uri: http::Uri = url.parse().map_err(|e| http_err(url, e))?;
            let authority = uri.authority().ok_or_else(|| http_err(url, "no host"))?;
            let port = authority.port_u16().unwrap_or(80);
            let host = authority.host().trim_start_matches('[').trim_end_matches(']');
            let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| http_err(url, e))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http_err(url, e))?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        match sender.send_request(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.sender = None;
                Err(http_err(url, e))
            }
        }
    }
}

/// One answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
}

/// How the last update went, told to the server on every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Report {
    applied: Option<String>,
    rejected: Option<(String, String)>,
}

/// The versions of the four types, as the status headers write them.
fn versions(d: &Discovered) -> String {
    fn v<T>(x: &Option<(String, Vec<T>)>) -> &str {
        x.as_ref().map_or("-", |(v, _)| v.as_str())
    }
    format!("{} {} {} {}", v(&d.listeners), v(&d.routes), v(&d.clusters), v(&d.endpoints))
}

/// A header value from text a proxy did not choose (an error message): printable ASCII only.
fn header_text(s: &str) -> HeaderValue {
    let clean: String =
        s.chars().take(MAX_ERROR_LEN).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("unprintable"))
}

/// The poller's state between polls.
struct Client {
    base: String,
    node: Option<String>,
    conn: Conn,
    /// What the server answered last, per type (`None`: 404 or not asked yet).
    held: Discovered,
    /// The snapshot `held` belongs to, when the server names snapshots.
    snapshot: Option<String>,
    report: Report,
    /// The last update refused, to keep reporting it while the server sends it again.
    refused: Option<Discovered>,
}

impl Client {
    fn request(&self, url: &str) -> http::request::Builder {
        // Origin form (`GET /mesh/v1/routes`): a plain file server takes the request target as a path.
        let path = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.path_and_query().map(|p| p.to_string()))
            .unwrap_or_else(|| "/".into());
        let mut b = http::Request::get(path)
            .header(http::header::HOST, self.conn.authority.as_str())
            .header(http::header::ACCEPT, "application/json");
        if let Some(n) = &self.node {
            b = b.header(headers::NODE, header_text(n));
            if let Some(a) = &self.report.applied {
                b = b.header(headers::APPLIED, header_text(a));
            }
            if let Some((v, e)) = &self.report.rejected {
                b = b.header(headers::REJECTED, header_text(v)).header(headers::ERROR, header_text(e));
            }
        }
        b
    }

    async fn get(&mut self, url: &str, req: http::request::Builder, timeout: Duration) -> Result<Answer, FetchError> {
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| http_err(url, e))?;
        let fetch = async {
            let resp = self.conn.send(url, req).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await.map_err(|e| http_err(url, e))?.to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(timeout, fetch).await {
            Ok(r) => r,
            Err(_) => {
                self.conn.sender = None;
                Err(http_err(url, "timed out"))
            }
        }
    }

    /// One type, full: `Ok(None)` for 404, the held answer for 304.
    async fn fetch_type<T: DeserializeOwned + Clone>(
        &mut self,
        kind: &str,
        held: Option<(String, Vec<T>)>,
        pin: Option<&str>,
    ) -> Result<Option<(String, Vec<T>)>, FetchError> {
        let url = format!("{}/v1/{kind}", self.base);
        let mut req = self.request(&url);
        if let Some((v, _)) = &held {
            req = req.header(http::header::IF_NONE_MATCH, format!("\"{v}\""));
        }
        if let Some(p) = pin {
            req = req.header(headers::SNAPSHOT, p);
        }
        let a = self.get(&url, req, FETCH_TIMEOUT).await?;
        match a.status {
            StatusCode::OK => {
                let r = DiscoveryResponse::<T>::from_json(&url, &a.body)?;
                Ok(Some((r.version_info, r.resources)))
            }
            StatusCode::NOT_MODIFIED if held.is_some() => Ok(held),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::CONFLICT => Err(FetchError::Gone { url }),
            s => Err(http_err(&url, format!("status {s}"))),
        }
    }

    /// The endpoints, waiting for a change when the server can; returns them and the snapshot
    /// the answer names.
    #[allow(clippy::type_complexity)]
    async fn fetch_endpoints(&mut self) -> Result<(Option<(String, Vec<RawEndpoints>)>, Option<String>), FetchError> {
        let url = format!("{}/v1/endpoints", self.base);
        let held = self.held.endpoints.clone();
        let mut req = self.request(&url);
        let mut timeout = FETCH_TIMEOUT;
        if let Some((v, _)) = &held {
            req = req.header(http::header::IF_NONE_MATCH, format!("\"{v}\"")).header(headers::DELTA, "1");
            if let Some(s) = &self.snapshot {
                req =
                    req.header(headers::SNAPSHOT, s.as_str()).header("prefer", format!("wait={}", LONG_POLL.as_secs()));
                timeout += LONG_POLL;
            }
        }
        let a = self.get(&url, req, timeout).await?;
        let snapshot = a.header(headers::SNAPSHOT);
        let eps = match a.status {
            StatusCode::OK => match (a.header(headers::DELTA), held) {
                (Some(since), Some((v, mut list))) if since == v => {
                    let d: EndpointsDelta = serde_json::from_slice(&a.body)
                        .map_err(|error| config::Error::Json { origin: url.clone(), error })?;
                    for e in d.resources {
                        match list.iter_mut().find(|x| x.cluster == e.cluster) {
                            Some(x) => *x = e,
                            None => list.push(e),
                        }
                    }
                    Some((d.version_info, list))
                }
                (Some(since), _) => return Err(FetchError::Delta { url, since }),
                (None, _) => {
                    let r = DiscoveryResponse::<RawEndpoints>::from_json(&url, &a.body)?;
                    Some((r.version_info, r.resources))
                }
            },
            StatusCode::NOT_MODIFIED if held.is_some() => held,
            StatusCode::NOT_FOUND => None,
            s => return Err(http_err(&url, format!("status {s}"))),
        };
        Ok((eps, snapshot))
    }

    /// One poll: the four types from one snapshot, applied together.
    async fn poll(&mut self, control: &Control) -> Result<bool, FetchError> {
        let (endpoints, snapshot) = match self.fetch_endpoints().await {
            Err(FetchError::Delta { .. }) => {
                // Start again from a full answer.
                self.held.endpoints = None;
                return Ok(true);
            }
            r => r?,
        };
        // Each of the other three: skipped when the snapshot says it did not move.
        let moved = |i: usize, held: Option<&String>| {
            let want = snapshot.as_deref().and_then(|s| s.split(' ').nth(i));
            want.is_none() || held.map(String::as_str) != want
        };
        let pin = snapshot.clone();
        let mut next = Discovered { endpoints, ..self.held.clone() };
        if moved(0, self.held.listeners.as_ref().map(|x| &x.0)) {
            next.listeners = self.fetch_type("listeners", self.held.listeners.clone(), pin.as_deref()).await?;
        }
        if moved(1, self.held.routes.as_ref().map(|x| &x.0)) {
            next.routes = self.fetch_type("routes", self.held.routes.clone(), pin.as_deref()).await?;
        }
        if moved(2, self.held.clusters.as_ref().map(|x| &x.0)) {
            next.clusters = self.fetch_type("clusters", self.held.clusters.clone(), pin.as_deref()).await?;
        }
        let outcome = control.apply_discovered(next.clone());
        let refused_again = outcome == Outcome::Unchanged && self.refused.as_ref() == Some(&next);
        if outcome == Outcome::Rejected || refused_again {
            let error = control.last_rejected().map_or_else(|| "rejected".to_string(), |r| r.error);
            self.report.rejected = Some((versions(&next), error));
            self.refused = Some(next.clone());
        } else {
            self.report = Report { applied: Some(versions(&next)), rejected: None };
            self.refused = None;
        }
        self.held = next;
        let long_poll = snapshot.is_some();
        self.snapshot = snapshot;
        Ok(long_poll)
    }
}

/// Polls for as long as the process runs: long polls with a server that supports them, else one
/// poll every `discovery.poll_interval` (also the pause after a failed poll).
pub async fn poll_loop(control: Arc<Control>, discovery: Discovery) {
    let authority =
        discovery.url.parse::<http::Uri>().ok().and_then(|u| u.authority().map(|a| a.to_string())).unwrap_or_default();
    let mut client = Client {
        base: discovery.url.clone(),
        node: node_name(&discovery),
        conn: Conn { authority, sender: None },
        held: Discovered::default(),
        snapshot: None,
        report: Report::default(),
        refused: None,
    };
    let mut last_error: Option<String> = None;
    loop {
        let again_at_once = match client.poll(&control).await {
            Ok(long_poll) => {
                last_error = None;
                long_poll
            }
            Err(FetchError::Gone { .. }) => true,
            Err(FetchError::Parse(e)) => {
                // Malformed JSON is a bad update, not an outage: NACK it like one.
                client.report.rejected = Some(("unparsable".into(), e.to_string()));
                control.reject_discovery(e);
                false
            }
            Err(e) => {
                control.metrics().discovery_fetch_errors.inc();
                client.snapshot = None;
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "discovery poll failed; keeping the current config");
                }
                last_error = Some(msg);
                false
            }
        };
        if !again_at_once {
            tokio::time::sleep(discovery.poll_interval).await;
        }
    }
}
