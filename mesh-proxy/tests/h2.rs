//! HTTP/2 through a whole in-process proxy: prior-knowledge h2c accepted on `http` and `auto`
//! routes, every stream routed on its own (weights and header rules over one connection),
//! upstream HTTP/2 on one multiplexed connection per endpoint or HTTP/1.1 as the cluster says
//! (translated both ways), trailers passed through, and the proxy's own errors answered to gRPC
//! calls as gRPC statuses (`grpc-timeout` respected); the rapid-reset bound on.

mod support;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    body::{Frame, Incoming},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{free_addr, listener_route, Backend, HttpClient, InProcess};
use tokio::net::TcpListener;

/// An HTTP/2 (h2c) server answering every request with `name`, its protocol version and a
/// `grpc-status: 0` trailer; `delay` before answering. Counts connections and requests.
struct H2Backend {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl H2Backend {
    async fn start(name: &'static str, delay: Duration) -> H2Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::Relaxed);
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        r.fetch_add(1, Ordering::Relaxed);
                        async move {
                            tokio::time::sleep(delay).await;
                            let body = format!("{name} {:?} {}", req.version(), req.uri().path());
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let frames = [Frame::data(Bytes::from(body)), Frame::trailers(trailers)];
                            Ok::<_, Infallible>(Response::new(Frames(frames.into())))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        H2Backend { addr, connections, requests }
    }
}

/// A response body of ready frames (data, then trailers).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// One HTTP/2 prior-knowledge client connection.
async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends one request on `sender`: status, headers, body and trailers.
async fn send(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String, Option<hyper::HeaderMap>) {
    let mut b = Request::builder().uri(format!("http://svc{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender.send_request(b.body(Empty::new()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, headers, String::from_utf8_lossy(&collected.to_bytes()).into_owned(), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_of_one_connection_is_routed_on_its_own() {
    // HTTP/1.1 backends: the HTTP/2 streams are translated.
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    for protocol in ["http", "auto"] {
        let listen = free_addr();
        let rules = "      - match: { headers: { x-ver: c } }\n        clusters: [{ name: c }]\n      - clusters: [{ name: a, weight: 50 }, { name: b, weight: 50 }]";
        let yaml = listener_route(listen, protocol, rules, &[("a", &[a.addr]), ("b", &[b.addr]), ("c", &[c.addr])]);
        let proxy = InProcess::start(&yaml).await;
        let sender = h2_client(listen).await;
        // 2,000 requests, 50 at a time on the one connection.
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..40 {
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    let mut s = sender.clone();
                    tokio::spawn(async move { send(&mut s, "/", &[]).await })
                })
                .collect();
            for t in batch {
                let (status, _, body, _) = t.await.unwrap();
                assert_eq!(status, 200);
                *counts.entry(body).or_default() += 1;
            }
        }
        let (na, nb) = (counts.get("a").copied().unwrap_or(0), counts.get("b").copied().unwrap_or(0));
        assert_eq!(na + nb, 2000, "{protocol}: {counts:?}");
        assert!((900..=1100).contains(&na), "{protocol}: 50/50 within ±5% over one connection: {counts:?}");
        // A header rule, per stream, on the same connection.
        let mut s = sender.clone();
        for _ in 0..20 {
            assert_eq!(send(&mut s, "/", &[("x-ver", "c")]).await.2, "c", "{protocol}");
        }
        drop(proxy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http2_multiplexes_one_connection_and_passes_trailers() {
    let h2 = H2Backend::start("h2", Duration::from_millis(20)).await;
    let listen = free_addr();
    let yaml = listener_route(listen, "http", "      - clusters: [{ name: up }]", &[("up", &[h2.addr])])
        .replace("- { name: up, connect_timeout: 1s }", "- { name: up, connect_timeout: 1s, protocol: http2 }");
    let proxy = InProcess::start(&yaml).await;
    // 100 concurrent HTTP/1.1 clients (100 downstream connections) share one upstream connection.
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = HttpClient::connect(listen).await.unwrap();
                c.get("/one", &[]).await.unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "h2 HTTP/2.0 /one".to_string()), "HTTP/1.1 translated to HTTP/2");
    }
    assert_eq!(h2.requests.load(Ordering::Relaxed), 100);
    assert_eq!(h2.connections.load(Ordering::Relaxed), 1, "one multiplexed upstream connection");
    // HTTP/2 downstream: the trailers come through.
    let mut s = h2_client(listen).await;
    let (status, _, body, trailers) = send(&mut s, "/two", &[("te", "trailers")]).await;
    assert_eq!((status, body.as_str()), (200, "h2 HTTP/2.0 /two"));
    assert_eq!(trailers.expect("trailers").get("grpc-status").unwrap(), "0");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_cluster_speaks_as_the_downstream_spoke() {
    let h2 = H2Backend::start("h2", Duration::ZERO).await;
    let h1 = Backend::start("h1").await;
    let listen = free_addr();
    let rules = "      - match: { headers: { x-up: h1 } }\n        clusters: [{ name: one }]\n      - clusters: [{ name: two }]";
    let yaml = listener_route(listen, "http", rules, &[("one", &[h1.addr]), ("two", &[h2.addr])])
        .replace("- { name: one, connect_timeout: 1s }", "- { name: one, connect_timeout: 1s, protocol: auto }")
        .replace("- { name: two, connect_timeout: 1s }", "- { name: two, connect_timeout: 1s, protocol: auto }");
    let proxy = InProcess::start(&yaml).await;
    let mut s = h2_client(listen).await;
    assert_eq!(send(&mut s, "/x", &[]).await.2, "h2 HTTP/2.0 /x", "HTTP/2 downstream, HTTP/2 upstream");
    let mut c = HttpClient::connect(listen).await.unwrap();
    assert_eq!(c.get("/", &[("x-up", "h1")]).await.unwrap(), (200, "h1".to_string()), "HTTP/1.1 both sides");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_errors_reach_grpc_clients_as_grpc_statuses() {
    let slow = H2Backend::start("slow", Duration::from_secs(3)).await;
    let dead = free_addr();
    let listen = free_addr();
    let rules = "      - match: { headers: { x-to: dead } }\n        clusters: [{ name: dead }]\n      - clusters: [{ name: slow }]";
    let yaml = listener_route(listen, "http", rules, &[("dead", &[dead]), ("slow", &[slow.addr])])
        .replace("- { name: slow, connect_timeout: 1s }", "- { name: slow, connect_timeout: 1s, protocol: http2 }");
    let proxy = InProcess::start(&yaml).await;
    let mut s = h2_client(listen).await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    // No upstream: UNAVAILABLE, trailers-only (an HTTP 200 whose headers end the stream).
    let (status, headers, body, trailers) =
        send(&mut s, "/pkg.Svc/Call", &[&grpc[..], &[("x-to", "dead")]].concat()).await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(headers.get("grpc-status").unwrap(), "14", "{headers:?}");
    assert_eq!(headers.get("grpc-message").unwrap(), "no healthy upstream");
    assert!(trailers.is_none());
    // The call's deadline is the proxy's timeout: DEADLINE_EXCEEDED after 200 ms, not 3 s.
    let start = Instant::now();
    let (_, headers, _, _) = send(&mut s, "/pkg.Svc/Call", &[&grpc[..], &[("grpc-timeout", "200m")]].concat()).await;
    assert_eq!(headers.get("grpc-status").unwrap(), "4", "{headers:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    // Not gRPC: the plain HTTP answer.
    let (status, _, body, _) = send(&mut s, "/", &[("x-to", "dead")]).await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_is_still_served_and_a_post_is_not_mistaken_for_the_preface() {
    let a = Backend::start("a").await;
    let listen = free_addr();
    let proxy =
        InProcess::start(&listener_route(listen, "http", "      - clusters: [{ name: a }]", &[("a", &[a.addr])])).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    assert_eq!(c.request(hyper::Method::POST, "/", &[]).await.unwrap(), (200, "a".to_string()));
    assert_eq!(c.request(hyper::Method::PUT, "/", &[]).await.unwrap(), (200, "a".to_string()));
    drop(proxy);
}

/// One raw HTTP/2 frame: its 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// The rapid-reset attack (CVE-2023-44487): a client opening streams and resetting each at once
/// makes the server start work it never finishes. hyper's bound is on: after 20 streams reset
/// before they were accepted, the proxy sends GOAWAY with ENHANCE_YOUR_CALM and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_with_enhance_your_calm() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = H2Backend::start("v1", Duration::from_secs(1)).await;
    let listen = free_addr();
    let yaml = listener_route(listen, "http", "      - clusters: [{ name: v1 }]", &[("v1", &[backend.addr])]);
    let proxy = InProcess::start(&yaml).await;
    let mut conn = tokio::net::TcpStream::connect(listen).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                       // HPACK: :method GET, :scheme http, :path / (static table), :authority "a" (literal).
    let headers = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    for i in 0..200u32 {
        let stream = 2 * i + 1;
        out.extend(frame(0x1, 0x5, stream, &headers)); // HEADERS, END_STREAM | END_HEADERS
        out.extend(frame(0x3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    conn.write_all(&out).await.unwrap();
    // Read frames until GOAWAY (or the end of the connection, which is a failure).
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        let mut head = [0u8; 9];
        loop {
            conn.read_exact(&mut head).await.expect("GOAWAY before the connection ends");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.unwrap();
            if head[3] == 0x7 {
                return u32::from_be_bytes(payload[4..8].try_into().unwrap());
            }
        }
    })
    .await
    .expect("GOAWAY within 5 s");
    assert_eq!(goaway, 0xb, "ENHANCE_YOUR_CALM");
    assert!(backend.requests.load(Ordering::Relaxed) < 200, "not every reset stream reached the backend");
    drop(proxy);
}
