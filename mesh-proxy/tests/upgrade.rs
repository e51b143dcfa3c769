//! HTTP/1.1 upgrades and CONNECT through a whole in-process proxy: the handshake is routed like a
//! request (header rules pick the backend), the upstream's `101` (or CONNECT's `200`) switches both
//! connections to a byte tunnel that half-closes, and a refused upgrade stays plain HTTP.

mod support;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use support::{free_addr, listener_route, InProcess};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// A server that accepts `Upgrade: echo` (or CONNECT) on every request, then echoes what it reads
/// with its `name` in front, and after the client's FIN writes `bye` and closes. A request that
/// asks for no upgrade gets `200 {name}`.
async fn echo_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                    let wants = req.headers().get("upgrade").map(|v| v.as_bytes() == b"echo").unwrap_or(false)
                        || req.method() == hyper::Method::CONNECT;
                    if !wants {
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(name.as_bytes()))));
                    }
                    let target = req.uri().to_string();
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(on.await.unwrap());
                        io.write_all(format!("{name} {target}\n").as_bytes()).await.unwrap();
                        let mut buf = [0u8; 1024];
                        loop {
                            let n = io.read(&mut buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            io.write_all(&buf[..n]).await.unwrap();
                        }
                        io.write_all(b"bye").await.unwrap();
                        io.shutdown().await.unwrap();
                    });
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    if req.method() != hyper::Method::CONNECT {
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut().insert("upgrade", "echo".parse().unwrap());
                        resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
                    }
                    Ok(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Sends a request head and reads the response head; returns the status line and headers.
async fn handshake(r: &mut BufReader<TcpStream>, head: &str) -> String {
    r.get_mut().write_all(head.as_bytes()).await.unwrap();
    let mut resp = String::new();
    loop {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await.unwrap().unwrap();
        if line == "\r\n" || line.is_empty() {
            return resp;
        }
        resp.push_str(&line);
    }
}

async fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await.unwrap().unwrap();
    line
}

#[tokio::test]
async fn upgrade_is_routed_by_header_rules_then_tunnels_with_half_close() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let listen = free_addr();
    let rules =
        "      - match: { headers: { x-ver: b } }\n        clusters: [{ name: b }]\n      - clusters: [{ name: a }]";
    let proxy = InProcess::start(&listener_route(listen, "http", rules, &[("a", &[a]), ("b", &[b])])).await;

    for (header, want) in [("", "a"), ("x-ver: b\r\n", "b")] {
        let mut r = BufReader::new(TcpStream::connect(listen).await.unwrap());
        let head = format!("GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n{header}\r\n");
        let resp = handshake(&mut r, &head).await;
        assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
        assert!(resp.to_ascii_lowercase().contains("upgrade: echo"), "{resp}");
        assert_eq!(read_line(&mut r).await, format!("{want} /chat\n"));
        for msg in ["one\n", "two\n"] {
            r.get_mut().write_all(msg.as_bytes()).await.unwrap();
            assert_eq!(read_line(&mut r).await, msg);
        }
        // Half-close: the client's FIN reaches the backend, whose answer still comes back.
        r.get_mut().shutdown().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_to_string(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, "bye");
    }
    drop(proxy);
}

/// Bytes the client sends in the same segment as its upgrade request are read by the proxy with
/// the request head; they must reach the backend once the tunnel is up (the splice starts after them).
#[tokio::test]
async fn bytes_right_behind_the_upgrade_request_are_passed_on() {
    let a = echo_backend("a").await;
    let listen = free_addr();
    let proxy =
        InProcess::start(&listener_route(listen, "http", "      - clusters: [{ name: a }]", &[("a", &[a])])).await;
    let mut r = BufReader::new(TcpStream::connect(listen).await.unwrap());
    let resp =
        handshake(&mut r, "GET /x HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly\n").await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    assert_eq!(read_line(&mut r).await, "a /x\n");
    assert_eq!(read_line(&mut r).await, "early\n");
    drop(proxy);
}

#[tokio::test]
async fn a_refused_upgrade_is_a_plain_response_and_h2c_is_not_forwarded() {
    let a = echo_backend("a").await;
    let listen = free_addr();
    let proxy =
        InProcess::start(&listener_route(listen, "http", "      - clusters: [{ name: a }]", &[("a", &[a])])).await;
    let mut r = BufReader::new(TcpStream::connect(listen).await.unwrap());
    // The backend only upgrades to `echo`: this one is answered 200 and the connection stays HTTP.
    let resp = handshake(&mut r, "GET / HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: other\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let mut body = [0u8; 1];
    r.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"a");
    // h2c is dropped: the request is answered as HTTP/1.1 on the same connection.
    let resp =
        handshake(&mut r, "GET / HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(proxy);
}

#[tokio::test]
async fn connect_keeps_its_authority_and_tunnels() {
    let fwd = echo_backend("fwd").await;
    let listen = free_addr();
    let proxy =
        InProcess::start(&listener_route(listen, "http", "      - clusters: [{ name: fwd }]", &[("fwd", &[fwd])]))
            .await;
    let mut r = BufReader::new(TcpStream::connect(listen).await.unwrap());
    let resp = handshake(&mut r, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(read_line(&mut r).await, "fwd example.com:443\n", "the authority-form reached the upstream");
    r.get_mut().write_all(b"ping\n").await.unwrap();
    assert_eq!(read_line(&mut r).await, "ping\n");
    drop(proxy);
}
