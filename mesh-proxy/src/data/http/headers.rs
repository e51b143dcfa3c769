//! What changes between the downstream and the upstream hop: hop-by-hop headers are dropped; the
//! request goes upstream as HTTP/1.1 in origin form with `Host`, or as HTTP/2 with the authority in
//! the URI (`:authority`); the response comes back in the downstream's version.

use std::{net::SocketAddr, sync::OnceLock};

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

/// Why a request is refused with 400 before it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BadRequest {
    TwoHosts,
    NoHost,
}

impl BadRequest {
    pub(super) fn reason(self) -> &'static str {
        match self {
            BadRequest::TwoHosts => "more than one Host header",
            BadRequest::NoHost => "an HTTP/1.1 request without Host",
        }
    }
}

/// Checks the request's `Host` (RFC 9112 §3.2) and adds what a proxy owes the next hop, before the
/// request is routed: `x-request-id` when absent (a random UUID, as Envoy makes one; the access log
/// keeps it), the client's address appended to `x-forwarded-for`, `x-forwarded-proto`. An HTTP/1.0
/// request without `Host` gets the address the client dialled (`dst`): it is forwarded as HTTP/1.1,
/// which must have one (nginx answers 400 otherwise).
pub(super) fn prepare_downstream_request<B>(
    req: &mut Request<B>,
    dst: SocketAddr,
    peer: SocketAddr,
) -> Result<(), BadRequest> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().is_some();
    if hosts.next().is_some() {
        return Err(BadRequest::TwoHosts);
    }
    if !host && req.uri().authority().is_none() && req.method() != Method::CONNECT {
        match req.version() {
            Version::HTTP_10 | Version::HTTP_09 => {
                let v = HeaderValue::from_str(&dst.to_string()).expect("an address is a valid header value");
                req.headers_mut().insert(header::HOST, v);
            }
            Version::HTTP_11 => return Err(BadRequest::NoHost),
            _ => {}
        }
    }
    let headers = req.headers_mut();
    if !headers.contains_key(&REQUEST_ID) {
        let id = uuid_v4(rand::random());
        headers.insert(REQUEST_ID, HeaderValue::from_str(&id).expect("a UUID is a valid header value"));
    }
    let ip = peer.ip().to_canonical();
    let xff = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip.to_string(),
    };
    // Several x-forwarded-for lines become one, with this hop last.
    headers.insert(FORWARDED_FOR, HeaderValue::from_str(&xff).expect("addresses are valid header values"));
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
    Ok(())
}

const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
const FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: header::HeaderName = header::HeaderName::from_static("x-forwarded-proto");

/// `n` as a version 4 (random) UUID: the version and variant bits set, hyphenated.
fn uuid_v4(n: u128) -> String {
    let n = (n & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Readies `req` for the upstream hop in HTTP/2 (`h2`) or HTTP/1.1.
pub(super) fn prepare_upstream_request<B>(req: &mut Request<B>, h2: bool) {
    req.headers_mut().append(HOP, hop_id().clone());
    // `TE: trailers` is the one TE HTTP/2 allows, and gRPC servers require it.
    let te_trailers =
        h2 && req.headers().get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Transfer codings besides chunked (`gzip, chunked`) describe the body bytes, which pass
    // unchanged: they go on (hyper re-chunks, and adds `chunked` if it is missing).
    let codings = (!h2).then(|| req.headers().get(header::TRANSFER_ENCODING).cloned()).flatten();
    strip_hop_by_hop(req.headers_mut());
    if let Some(te) = codings {
        req.headers_mut().insert(header::TRANSFER_ENCODING, te);
    }
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
        // upstream, the authority (which routed it) in Host, replacing any other (RFC 9112 §3.2.2).
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(header::HOST, v);
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
    // The transfer codings stay (`gzip, chunked`: the body bytes pass unchanged); with them, a
    // Content-Length is wrong (RFC 9112 §6.3: Transfer-Encoding wins) and would make hyper refuse
    // to write the response at all.
    let codings = (!h2).then(|| resp.headers().get(header::TRANSFER_ENCODING).cloned()).flatten();
    strip_hop_by_hop(resp.headers_mut());
    if let Some(te) = codings {
        resp.headers_mut().insert(header::TRANSFER_ENCODING, te);
        resp.headers_mut().remove(header::CONTENT_LENGTH);
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
    fn request_ids_are_version_4_uuids() {
        assert_eq!(uuid_v4(0), "00000000-0000-4000-8000-000000000000");
        assert_eq!(uuid_v4(u128::MAX), "ffffffff-ffff-4fff-bfff-ffffffffffff");
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
