//! What changes between the downstream and the upstream hop: hop-by-hop headers are dropped; the
//! request goes upstream as HTTP/1.1 in origin form with `Host`, or as HTTP/2 with the authority in
//! the URI (`:authority`); the response comes back in the downstream's version.

use std::sync::OnceLock;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The two hop-by-hop names `http` has no constant for, after those of [`HOP_BY_HOP`].
const HOP_BY_HOP_OTHER: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Which hop-by-hop name `name` is: an index into [`HOP_BY_HOP`] then [`HOP_BY_HOP_OTHER`].
fn hop_by_hop_index(name: &header::HeaderName) -> Option<usize> {
    HOP_BY_HOP
        .iter()
        .position(|h| h == name)
        .or_else(|| HOP_BY_HOP_OTHER.iter().position(|h| name == h).map(|i| HOP_BY_HOP.len() + i))
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the hop-by-hop headers present (usually none, or Connection
    // alone), so only those are removed: no hashed removal of absent names per message, no
    // name parsing, no allocation.
    let mut found = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            found |= 1 << i;
        }
    }
    if found == 0 {
        return;
    }
    // Headers named in Connection are hop-by-hop too; only those present need a removal.
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // keep-alive is in `found` already; skipping it spares parsing the common token.
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("keep-alive") && headers.contains_key(*n))
        .filter_map(|n| header::HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| hop_by_hop_index(n).is_none())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP_OTHER.iter().enumerate() {
        if found & (1 << (HOP_BY_HOP.len() + i)) != 0 {
            headers.remove(*n);
        }
    }
}

/// The header each proxy adds to the requests it forwards, with its own pseudonym: a request that
/// arrives carrying this proxy's is one it sent, come back through a loop validation could not
/// see (issue 12: an endpoint reaching the proxy's listener through another hop). `Via` (RFC 9110
/// §7.6.3) is meant for this, but nginx's default `gzip_proxied off` stops compressing the
/// responses to any request with a `Via`, which every meshed client would then pay for.
pub(super) const HOP: header::HeaderName = header::HeaderName::from_static("x-mesh-proxy-hop");

/// This process's pseudonym in [`HOP`]: random, so two proxies never share one.
fn hop_id() -> &'static HeaderValue {
    static ID: OnceLock<HeaderValue> = OnceLock::new();
    ID.get_or_init(|| {
        HeaderValue::from_str(&format!("{:016x}", rand::random::<u64>())).expect("hex is a valid header value")
    })
}

/// Whether `headers` say the request already went through this proxy.
pub(super) fn looped(headers: &HeaderMap) -> bool {
    let id = hop_id().as_bytes();
    headers.get_all(&HOP).iter().any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii() == id))
}

/// Readies `req` for the upstream hop in HTTP/2 (`h2`) or HTTP/1.1.
pub(super) fn prepare_upstream_request<B>(req: &mut Request<B>, h2: bool) {
    req.headers_mut().append(HOP, hop_id().clone());
    // `TE: trailers` is the one TE HTTP/2 allows, and gRPC servers require it.
    let te_trailers =
        h2 && req.headers().get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(req.headers_mut());
    if h2 {
        if te_trailers {
            req.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        }
        to_h2_form(req);
        return;
    }
    *req.version_mut() = Version::HTTP_11;
    // CONNECT's authority-form (`host:port`) is the tunnel's far end, and stays as it is.
    if req.method() == Method::CONNECT {
        return;
    }
    if let Some(a) = req.uri().authority() {
        // Absolute-form from a client that thinks it talks to a forward proxy: origin-form
        // upstream, the authority in Host.
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

/// An HTTP/2 request carries its authority and scheme in the URI (`:authority`, `:scheme`): an
/// HTTP/1 request's `Host` moves there.
fn to_h2_form<B>(req: &mut Request<B>) {
    *req.version_mut() = Version::HTTP_2;
    if req.method() == Method::CONNECT || req.uri().authority().is_some() {
        return;
    }
    let Some(host) = req.headers_mut().remove(header::HOST) else { return };
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri = std::str::from_utf8(host.as_bytes()).ok().and_then(|h| format!("http://{h}{pq}").parse::<Uri>().ok());
    match uri {
        Some(uri) => *req.uri_mut() = uri,
        None => {
            req.headers_mut().insert(header::HOST, host);
        }
    }
}

/// Readies an upstream response for the downstream hop, which speaks HTTP/2 (`h2`) or HTTP/1.1.
pub(super) fn prepare_downstream_response(resp: &mut Response<Incoming>, h2: bool) {
    // The upstream's connection management (close, HTTP/1.0) is its hop's business; the downstream
    // connection stays keep-alive.
    let chunked = !h2 && resp.headers().get(header::TRANSFER_ENCODING).is_some();
    strip_hop_by_hop(resp.headers_mut());
    if chunked {
        resp.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    *resp.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_stripped() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Trace , close"),
            ("x-trace", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "x"),
            ("proxy-authorization", "basic x"),
            ("end-user", "jason"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "end-user"]);
        // A header named `close` is removed when Connection names it.
        let mut h = map(&[("connection", "close"), ("close", "1"), ("via", "x")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["via"]);
        // Nothing hop-by-hop: nothing changes.
        let mut h = map(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn a_request_this_proxy_forwarded_is_recognised() {
        let mut req = Request::new(());
        assert!(!looped(req.headers()));
        req.headers_mut().append(HOP, HeaderValue::from_static("0123456789abcdef"));
        assert!(!looped(req.headers()), "another proxy's");
        prepare_upstream_request(&mut req, false);
        assert!(looped(req.headers()));
        // Among others in one comma-separated value.
        let mut h = HeaderMap::new();
        h.insert(HOP, HeaderValue::from_str(&format!("aa, {}", hop_id().to_str().unwrap())).unwrap());
        assert!(looped(&h));
    }
}
