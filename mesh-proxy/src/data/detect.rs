//! Protocol detection for `protocol: auto`: HTTP/1 if the first bytes are a request line's method,
//! HTTP/2 if they are its connection preface (prior knowledge, RFC 9113 §3.4: h2c as gRPC and
//! `nghttp`/`h2load` speak it).
//!
//! Bytes are peeked, never consumed, so whichever path is chosen sees the stream from its start.
//! The wait is bounded: a server-first protocol (MySQL, SMTP) sends nothing until the server
//! greets, so after [`DETECT_TIMEOUT`] of silence the connection is treated as opaque TCP.

use std::time::Duration;

use tokio::net::TcpStream;

/// Long enough for a client's first segment on any sane network, short enough that a
/// server-first protocol's greeting is delayed by at most this.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(200);

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Anything else (forwarded intact as TCP).
    Opaque,
    /// A prefix of a method: wait for more bytes.
    NeedMore,
}

const METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// What an HTTP/2 client with prior knowledge sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies the first bytes of a connection. Total over all inputs (fuzzed).
pub fn classify(buf: &[u8]) -> Detected {
    if buf.is_empty() {
        return Detected::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    let mut prefix_of_some = buf[..n] == H2_PREFACE[..n];
    if prefix_of_some && n == H2_PREFACE.len() {
        return Detected::Http2;
    }
    for m in METHODS {
        if buf.len() >= m.len() {
            if buf.starts_with(m) {
                return Detected::Http1;
            }
        } else if m.starts_with(buf) {
            prefix_of_some = true;
        }
    }
    if prefix_of_some {
        Detected::NeedMore
    } else {
        Detected::Opaque
    }
}

/// Peeks at the stream until [`classify`] decides or `timeout` passes (then: opaque).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Detected::Opaque),
        };
        if n == 0 {
            // The client closed without sending: nothing to route per request.
            return Ok(Detected::Opaque);
        }
        match classify(&buf[..n]) {
            Detected::NeedMore => {
                // peek returns at once while bytes are queued; pause instead of spinning until
                // more arrive.
                if n == seen {
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Detected::Opaque);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                seen = n;
            }
            d => return Ok(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Detected::Http1);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Detected::Http1);
        assert_eq!(classify(b"GE"), Detected::NeedMore);
        assert_eq!(classify(b"P"), Detected::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"), Detected::Http2);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Detected::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"), Detected::Opaque);
        assert_eq!(classify(b"PUT /"), Detected::Http1);
        assert_eq!(classify(b"\x16\x03\x01"), Detected::Opaque);
        assert_eq!(classify(b"GETX"), Detected::Opaque);
        assert_eq!(classify(b"get / HTTP/1.1"), Detected::Opaque);
    }

    #[tokio::test]
    async fn silence_means_opaque_within_the_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(detect(&s, Duration::from_millis(100)).await.unwrap(), Detected::Opaque);
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(c);
    }

    #[tokio::test]
    async fn a_request_line_split_over_two_writes_is_http() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        c.set_nodelay(true).unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(b"PO").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(b"ST / HTTP/1.1\r\n").await.unwrap();
            c
        });
        assert_eq!(detect(&s, Duration::from_millis(500)).await.unwrap(), Detected::Http1);
        drop(writer.await.unwrap());
    }
}
