//! The readiness port (Istio's 15021 `/healthz/ready`): `GET /ready` and nothing else, so the
//! kubelet, which probes the pod IP, can reach it on all addresses while the admin API — with
//! `POST /quitquitquit` and `POST /logging` — stays on loopback. Everything else is 404, so this
//! port tells a stranger nothing about the proxy. It runs on the control runtime next to the admin
//! server.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::drain;

/// The answer of `/ready`, here and on the admin API: the process serves only once its config
/// is loaded and its listeners are bound, so being up is ready until the drain begins.
pub fn answer(drain: &drain::Trigger) -> Response<Full<Bytes>> {
    if drain.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    } else {
        text(StatusCode::OK, "LIVE\n")
    }
}

/// Serves `GET /ready` on `listener` forever.
pub async fn serve(drain: Arc<drain::Trigger>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "readiness accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let drain = drain.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/ready") => answer(&drain),
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
