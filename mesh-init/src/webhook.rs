//! `mesh-init webhook`: the injector as a mutating admission webhook, so that pods created by
//! anyone (a Deployment's ReplicaSet, a Helm chart, an operator, `kubectl run`) get the mesh
//! without `mesh-init inject` in their path.
//!
//! HTTPS (the API server calls webhooks over TLS only) on `--listen`, default 0.0.0.0:15017
//! (Istio's injector port):
//! - `POST /inject`: an AdmissionReview v1 in, an AdmissionReview with a JSON patch out
//!   ([`review`]); the pod is injected exactly as `mesh-init inject` injects it, with the same
//!   [`Settings`](crate::inject::Settings) flags;
//! - `GET /ready`: 200 once serving, for the webhook Deployment's own probe.
//!
//! Which pods are sent here is the MutatingWebhookConfiguration's business (deploy/webhook.yaml:
//! namespaces labelled `mesh-init.io/inject=enabled`, or pods labelled `mesh-init.io/inject=true`
//! or Istio's `sidecar.istio.io/inject=true`); the webhook itself still honours a pod's opt-out
//! annotations and labels, ours and Istio's. The certificate is reloaded when its files change
//! ([`tls`]). HTTP/1.1 only: the API server's client falls back to it.

mod review;
mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use review::{answer, respond, BadReview};
pub use tls::{Reloading, TlsError};

use crate::inject::Settings;

/// The largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 8 << 20;
/// How long a client may take to finish its TLS handshake and request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// `mesh-init webhook`'s flags: where to listen, the certificate, and how to inject.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// PEM certificate chain the API server verifies (its caBundle must hold the issuer).
    #[arg(long = "tls-cert")]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long = "tls-key")]
    pub tls_key: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on standard output).
    #[arg(long = "listen", default_value = "0.0.0.0:15017")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub settings: Settings,
}

/// Why the webhook could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Settings(#[from] crate::inject::Error),
    #[error("--listen {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Serves until SIGTERM or SIGINT.
pub fn run(args: WebhookArgs) -> Result<(), Error> {
    args.settings.check()?;
    let certs = Reloading::new(&args.tls_cert, &args.tls_key)?;
    let acceptor = TlsAcceptor::from(Arc::new(certs.server_config()?));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    runtime.block_on(serve(args.listen, acceptor, Arc::new(args.settings)))
}

async fn serve(addr: SocketAddr, acceptor: TlsAcceptor, settings: Arc<Settings>) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })?;
    let bound = listener.local_addr().map_err(|source| Error::Listen { addr, source })?;
    // One line a test or a script can wait for.
    println!("mesh-init webhook: listening on https://{bound}");
    tracing::info!(%bound, "webhook listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(Error::Runtime)?;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = service_fn(move |req| handle(req, settings.clone()));
            let conn = http1::Builder::new()
                .header_read_timeout(CLIENT_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    tracing::info!("webhook stopping");
    Ok(())
}

async fn handle(req: Request<Incoming>, settings: Arc<Settings>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let reply = |status: StatusCode, body: String, kind: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", kind)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    let text = |status, body: &str| reply(status, format!("{body}\n"), "text/plain");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => Ok(text(StatusCode::OK, "ready")),
        (&Method::POST, "/inject") => {
            let json = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim() == "application/json"));
            if !json {
                return Ok(text(StatusCode::UNSUPPORTED_MEDIA_TYPE, "expected Content-Type: application/json"));
            }
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, &format!("reading the body: {e}"))),
            };
            // Injection is CPU work of well under a millisecond per pod; no need to leave the task.
            match answer(&body, &settings) {
                Ok(review) => Ok(reply(StatusCode::OK, review.to_string(), "application/json")),
                Err(e) => Ok(text(StatusCode::BAD_REQUEST, &e.to_string())),
            }
        }
        (_, "/inject" | "/ready") => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")),
        _ => Ok(text(StatusCode::NOT_FOUND, "not found: POST /inject, GET /ready")),
    }
}
