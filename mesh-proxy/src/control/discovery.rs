//! The dynamic source: polls `discovery.url` + `/v1/listeners`, `/v1/routes`, `/v1/clusters` and
//! `/v1/endpoints`, each answering `{"version_info": "...", "resources": [...]}` with the same
//! objects as the file.
//!
//! A type the server answers 404 for is taken from the file. A poll in which any type could not be
//! fetched or parsed as JSON changes nothing (counted in `mesh_proxy_discovery_fetch_errors_total`);
//! a poll whose answers parse but do not validate is a rejected update.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::{
    config::{self, Discovery, DiscoveryResponse},
    control::{Control, Discovered},
};

/// Answers larger than this are refused (a config is kilobytes; this bounds a broken server).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error(transparent)]
    Parse(#[from] config::Error),
}

fn http_err(url: &str, reason: impl std::fmt::Display) -> FetchError {
    FetchError::Http { url: url.to_string(), reason: reason.to_string() }
}

/// GETs `url`; `Ok(None)` for a 404.
async fn get(url: &str) -> Result<Option<Bytes>, FetchError> {
    let uri: http::Uri = url.parse().map_err(|e| http_err(url, e))?;
    let authority = uri.authority().ok_or_else(|| http_err(url, "no host"))?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let fetch = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| http_err(url, e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http_err(url, e))?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| http_err(url, e))?;
        let resp = sender.send_request(req).await.map_err(|e| http_err(url, e))?;
        match resp.status() {
            http::StatusCode::OK => {}
            http::StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(http_err(url, format!("status {s}"))),
        }
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| http_err(url, e))?
            .to_bytes();
        Ok(Some(body))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch).await.map_err(|_| http_err(url, "timed out"))?
}

async fn fetch_type<T: DeserializeOwned>(base: &str, kind: &str) -> Result<Option<(String, Vec<T>)>, FetchError> {
    let url = format!("{base}/v1/{kind}");
    match get(&url).await? {
        None => Ok(None),
        Some(body) => {
            let r = DiscoveryResponse::<T>::from_json(&url, &body)?;
            Ok(Some((r.version_info, r.resources)))
        }
    }
}

/// Fetches all four types.
pub async fn fetch(base: &str) -> Result<Discovered, FetchError> {
    let (listeners, routes, clusters, endpoints) = tokio::try_join!(
        fetch_type(base, "listeners"),
        fetch_type(base, "routes"),
        fetch_type(base, "clusters"),
        fetch_type(base, "endpoints"),
    )?;
    Ok(Discovered { listeners, routes, clusters, endpoints })
}

/// Polls every `discovery.poll_interval` for as long as the process runs.
pub async fn poll_loop(control: Arc<Control>, discovery: Discovery) {
    let mut last_error: Option<String> = None;
    loop {
        match fetch(&discovery.url).await {
            Ok(found) => {
                last_error = None;
                control.apply_discovered(found);
            }
            Err(FetchError::Parse(e)) => {
                // Malformed JSON is a bad update, not an outage: NACK it like one.
                control.reject_discovery(e);
            }
            Err(e) => {
                control.metrics().discovery_fetch_errors.inc();
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "discovery poll failed; keeping the current config");
                }
                last_error = Some(msg);
            }
        }
        tokio::time::sleep(discovery.poll_interval).await;
    }
}
