//! The readiness port (Istio's 15021 `/healthz/ready`): `GET /ready` and nothing else, so the
//! kubelet, which probes the pod IP, can reach it on all addresses while the admin API — with
//! `POST /quitquitquit` and `POST /logging` — stays on loopback. Everything else is 404, so this
//! port tells a stranger nothing about the proxy. It runs on the control runtime next to the admin
//! server.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::drain;

/// What `/ready` answers, here and on the admin API: whether a valid config is being served.
/// The admin side answers from the start, before the first config is built (503
/// `INITIALIZING`), and a config that does not validate is never applied, so once serving the
/// proxy stays ready until the drain begins (503 `DRAINING`).
pub struct Health {
    /// The first config is in force: listeners bound, snapshot built.
    serving: AtomicBool,
    drain: Arc<drain::Trigger>,
}

impl Health {
    pub fn new(drain: Arc<drain::Trigger>) -> Self {
        Self { serving: AtomicBool::new(false), drain }
    }

    /// The first config is in force.
    pub fn serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    pub fn answer(&self) -> Response<Full<Bytes>> {
        if self.drain.is_draining() {
            text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
        } else if !self.serving.load(Ordering::Acquire) {
            text(StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n")
        } else {
            text(StatusCode::OK, "LIVE\n")
        }
    }

    /// The drain has begun (SIGTERM, `/quitquitquit`).
    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }
}

/// Serves `GET /ready` on `listener` forever.
pub async fn serve(health: Arc<Health>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "readiness accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/ready") => health.answer(),
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
