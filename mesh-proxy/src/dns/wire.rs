//! The DNS message format (RFC 1035 §4, EDNS's OPT record of RFC 6891), as much of it as a
//! forwarding proxy needs: a query's header, question and advertised UDP size; answers with A and
//! AAAA records, error and truncated responses; and, in an upstream's response, its code, whether it
//! was truncated, and where its records' TTLs are (for caching, and aging a cached copy).
//!
//! Total over all inputs: a malformed message is an error, never a panic; compression pointers
//! are followed backwards only, so they cannot loop. Checked on random mutations of real messages
//! (the tests below) and by the cargo-fuzz target `fuzz/fuzz_targets/dns.rs`.

use std::net::IpAddr;

/// The size every DNS client accepts over UDP without EDNS.
pub const CLASSIC_UDP_SIZE: usize = 512;
const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;

/// Flags (second header word).
const QR: u16 = 0x8000;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const OPCODE: u16 = 0x7800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("shorter than a DNS header")]
    NoHeader,
    #[error("message ends inside a {0}")]
    Truncated(&'static str),
    #[error("malformed name")]
    BadName,
}

/// A query: enough to answer it, forward it and cache its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Opcode and RD, copied into the response.
    flags: u16,
    /// The question's name, lower case, no trailing dot (`""` for the root); `None` when a label
    /// holds bytes no configured name has (a dot, a space, non-ASCII): such a query is forwarded.
    pub name: Option<String>,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section exactly as received (copied into responses).
    question: Vec<u8>,
    /// The UDP payload size the client advertised with EDNS; `None` without EDNS.
    pub edns_size: Option<u16>,
}

/// Why a message cannot be answered as a query; the response to give when it can be answered at
/// all (the ID was readable).
#[derive(Debug)]
pub enum Refused {
    /// Not worth an answer (no header, or it is itself a response).
    Drop,
    /// Answer this (FORMERR or NOTIMP) to the client.
    Answer(Vec<u8>),
}

impl Query {
    pub fn parse(buf: &[u8]) -> Result<Query, Refused> {
        if buf.len() < HEADER {
            return Err(Refused::Drop);
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let flags = u16::from_be_bytes([buf[2], buf[3]]);
        if flags & QR != 0 {
            return Err(Refused::Drop);
        }
        let bare = |rcode| Refused::Answer(header(id, (flags & (OPCODE | RD)) | QR | RA, rcode, 0, 0));
        if flags & OPCODE != 0 {
            return Err(bare(RCODE_NOTIMP));
        }
        let count = |i: usize| u16::from_be_bytes([buf[4 + 2 * i], buf[5 + 2 * i]]) as usize;
        if count(0) != 1 {
            return Err(bare(RCODE_FORMERR));
        }
        let parsed = (|| {
            let (name, end) = read_name(buf, HEADER)?;
            let fixed = buf.get(end..end + 4).ok_or(WireError::Truncated("question"))?;
            let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
            let question_end = end + 4;
            // EDNS: an OPT record among the additional records (after any answer and authority
            // records a query should not have, but may).
            let mut pos = question_end;
            let mut edns_size = None;
            for i in 0..count(1) + count(2) + count(3) {
                let rr = read_record(buf, pos)?;
                if i >= count(1) + count(2) && rr.rtype == TYPE_OPT {
                    edns_size = Some(rr.class);
                }
                pos = rr.end;
            }
            Ok::<_, WireError>(Query {
                id,
                flags: flags & (OPCODE | RD),
                name,
                qtype,
                qclass,
                question: buf[HEADER..question_end].to_vec(),
                edns_size,
            })
        })();
        parsed.map_err(|_| bare(RCODE_FORMERR))
    }

    /// Whether the proxy may answer it from its names: an A or AAAA question in class IN.
    pub fn is_address_question(&self) -> bool {
        self.qclass == CLASS_IN && (self.qtype == TYPE_A || self.qtype == TYPE_AAAA)
    }

    /// The largest response the client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        self.edns_size.map_or(CLASSIC_UDP_SIZE, |s| (s as usize).max(CLASSIC_UDP_SIZE))
    }

    /// The records of `addrs` that answer the question's type (A for IPv4, AAAA for IPv6), as an
    /// authoritative answer with `ttl`. None of that family: NOERROR with no answer (NODATA), so
    /// the client knows the name exists and asks nobody else.
    pub fn answer(&self, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
        let records: Vec<&IpAddr> = addrs
            .iter()
            .filter(|a| match a {
                IpAddr::V4(_) => self.qtype == TYPE_A,
                IpAddr::V6(_) => self.qtype == TYPE_AAAA,
            })
            .collect();
        let mut out = header(self.id, self.flags | QR | AA | RA, RCODE_NOERROR, 1, records.len() as u16);
        out.extend_from_slice(&self.question);
        for a in records {
            // The owner name: a pointer to the question's (offset 12).
            out.extend_from_slice(&[0xc0, HEADER as u8]);
            out.extend_from_slice(&self.qtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            match a {
                IpAddr::V4(v4) => {
                    out.extend_from_slice(&4u16.to_be_bytes());
                    out.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    out.extend_from_slice(&16u16.to_be_bytes());
                    out.extend_from_slice(&v6.octets());
                }
            }
        }
        out
    }

    /// A response with `rcode` and no records (SERVFAIL when no upstream answered).
    pub fn error(&self, rcode: u8) -> Vec<u8> {
        let mut out = header(self.id, self.flags | QR | RA, rcode, 1, 0);
        out.extend_from_slice(&self.question);
        out
    }

    /// The question alone with TC set: the answer does not fit UDP, ask again over TCP.
    pub fn truncated(&self) -> Vec<u8> {
        let mut out = header(self.id, self.flags | QR | RA | TC, RCODE_NOERROR, 1, 0);
        out.extend_from_slice(&self.question);
        out
    }
}

fn header(id: u16, flags: u16, rcode: u8, qdcount: u16, ancount: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&(flags | u16::from(rcode & 0x0f)).to_be_bytes());
    for count in [qdcount, ancount, 0, 0] {
        h.extend_from_slice(&count.to_be_bytes());
    }
    h
}

/// What the proxy needs of an upstream's response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    pub truncated: bool,
    /// Where each record's TTL is (answer, authority and additional; not OPT's, which holds flags).
    pub ttl_offsets: Vec<usize>,
    /// The smallest TTL among the answer and authority records; `None` when there are none (then
    /// there is nothing to say how long the answer holds, and it is not cached).
    pub min_ttl: Option<u32>,
}

impl Response {
    pub fn parse(buf: &[u8]) -> Result<Response, WireError> {
        if buf.len() < HEADER {
            return Err(WireError::NoHeader);
        }
        let flags = u16::from_be_bytes([buf[2], buf[3]]);
        let count = |i: usize| u16::from_be_bytes([buf[4 + 2 * i], buf[5 + 2 * i]]) as usize;
        let mut pos = HEADER;
        for _ in 0..count(0) {
            let (_, end) = read_name(buf, pos)?;
            pos = end + 4;
            if pos > buf.len() {
                return Err(WireError::Truncated("question"));
            }
        }
        let mut ttl_offsets = Vec::new();
        let mut min_ttl: Option<u32> = None;
        for i in 0..count(1) + count(2) + count(3) {
            let rr = read_record(buf, pos)?;
            if rr.rtype != TYPE_OPT {
                ttl_offsets.push(rr.ttl_offset);
                if i < count(1) + count(2) {
                    min_ttl = Some(min_ttl.map_or(rr.ttl, |m| m.min(rr.ttl)));
                }
            }
            pos = rr.end;
        }
        Ok(Response {
            id: u16::from_be_bytes([buf[0], buf[1]]),
            rcode: (flags & 0x000f) as u8,
            truncated: flags & TC != 0,
            ttl_offsets,
            min_ttl,
        })
    }

    /// Whether `buf` is a response (QR set).
    pub fn is_response(buf: &[u8]) -> bool {
        buf.len() >= HEADER && buf[2] & 0x80 != 0
    }
}

/// Rewrites a stored response for another query: its ID, and every TTL less `age` seconds.
pub fn restamp(buf: &mut [u8], id: u16, ttl_offsets: &[usize], age: u32) {
    buf[..2].copy_from_slice(&id.to_be_bytes());
    for &o in ttl_offsets {
        let ttl = u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        buf[o..o + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
    }
}

/// One resource record's fixed fields.
struct Record {
    rtype: u16,
    class: u16,
    ttl: u32,
    ttl_offset: usize,
    /// Where the next record starts.
    end: usize,
}

fn read_record(buf: &[u8], pos: usize) -> Result<Record, WireError> {
    let name_end = skip_name(buf, pos)?;
    let f = buf.get(name_end..name_end + 10).ok_or(WireError::Truncated("record"))?;
    let rdlength = u16::from_be_bytes([f[8], f[9]]) as usize;
    let end = name_end + 10 + rdlength;
    if end > buf.len() {
        return Err(WireError::Truncated("record data"));
    }
    Ok(Record {
        rtype: u16::from_be_bytes([f[0], f[1]]),
        class: u16::from_be_bytes([f[2], f[3]]),
        ttl: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
        ttl_offset: name_end + 4,
        end,
    })
}

fn skip_name(buf: &[u8], pos: usize) -> Result<usize, WireError> {
    walk_name(buf, pos, |_| {}).map(|(_, end)| end)
}

/// Reads the name at `pos`: (its text if every label is plain, where the name ends in `buf`).
fn read_name(buf: &[u8], pos: usize) -> Result<(Option<String>, usize), WireError> {
    let mut name = String::new();
    let mut plain = true;
    let (_, end) = walk_name(buf, pos, |label| {
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            plain = false;
            return;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
    })?;
    Ok((plain.then_some(name), end))
}

/// Calls `label` for each label of the name at `pos`, following compression pointers (only
/// backwards); returns the name's wire length and where it ends at `pos`.
fn walk_name(buf: &[u8], pos: usize, mut label: impl FnMut(&[u8])) -> Result<(usize, usize), WireError> {
    let mut at = pos;
    let mut end = None;
    let mut length = 1;
    loop {
        let len = *buf.get(at).ok_or(WireError::Truncated("name"))? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => break,
            0x00 => {
                let l = buf.get(at + 1..at + 1 + len).ok_or(WireError::Truncated("name"))?;
                length += len + 1;
                if length > 255 {
                    return Err(WireError::BadName);
                }
                label(l);
                at += 1 + len;
            }
            0xc0 => {
                let lo = *buf.get(at + 1).ok_or(WireError::Truncated("name"))? as usize;
                let target = ((len & 0x3f) << 8) | lo;
                if target >= at {
                    return Err(WireError::BadName);
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(WireError::BadName),
        }
    }
    Ok((length, end.unwrap_or(at + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as `dig` writes one: `name` `qtype`, RD, optionally with an EDNS OPT record.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut q = header(id, RD, 0, 1, 0);
        for l in name.split('.').filter(|l| !l.is_empty()) {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            q[11] = 1; // ARCOUNT
            q.extend_from_slice(&[0, 0, 41]);
            q.extend_from_slice(&size.to_be_bytes());
            q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        q
    }

    #[test]
    fn a_query_parses_and_is_answered() {
        let q = Query::parse(&query(7, "Reviews.Default.", TYPE_A, Some(1232))).unwrap();
        assert_eq!((q.id, q.name.as_deref(), q.qtype), (7, Some("reviews.default"), TYPE_A));
        assert_eq!(q.udp_limit(), 1232);
        let addrs: Vec<IpAddr> = vec!["10.96.0.20".parse().unwrap(), "fd00::20".parse().unwrap()];
        let a = q.answer(&addrs, 30);
        let r = Response::parse(&a).unwrap();
        assert_eq!((r.id, r.rcode, r.truncated, r.min_ttl), (7, RCODE_NOERROR, false, Some(30)));
        assert_eq!(r.ttl_offsets.len(), 1, "only the A record answers an A question");
        assert_eq!(&a[a.len() - 4..], &[10, 96, 0, 20]);
        let aaaa = Query::parse(&query(8, "reviews.default", TYPE_AAAA, None)).unwrap();
        assert_eq!(aaaa.udp_limit(), 512);
        let a = aaaa.answer(&addrs[..1], 30);
        assert_eq!(Response::parse(&a).unwrap().ttl_offsets.len(), 0, "NODATA: the name has no IPv6 address");
    }

    #[test]
    fn restamping_ages_ttls_and_sets_the_id() {
        let q = Query::parse(&query(1, "a.b", TYPE_A, None)).unwrap();
        let mut a = q.answer(&["10.0.0.1".parse().unwrap()], 30);
        let r = Response::parse(&a).unwrap();
        restamp(&mut a, 0xbeef, &r.ttl_offsets, 12);
        let r = Response::parse(&a).unwrap();
        assert_eq!((r.id, r.min_ttl), (0xbeef, Some(18)));
    }

    #[test]
    fn malformed_messages_are_refused_not_panics() {
        assert!(matches!(Query::parse(&[0; 5]), Err(Refused::Drop)));
        let mut q = query(3, "a.b", TYPE_A, None);
        q[5] = 2; // QDCOUNT 2
        assert!(matches!(Query::parse(&q), Err(Refused::Answer(a)) if a[3] & 0x0f == RCODE_FORMERR));
        let q = query(3, "a.b", TYPE_A, None);
        assert!(matches!(Query::parse(&q[..q.len() - 3]), Err(Refused::Answer(_))));
        // A pointer to itself (a loop) and a forward pointer are errors.
        let mut looped = header(1, 0, 0, 1, 0);
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(Query::parse(&looped), Err(Refused::Answer(_))));
        for cut in 0..q.len() {
            let _ = Query::parse(&q[..cut]);
            let _ = Response::parse(&q[..cut]);
        }
    }

    #[test]
    fn random_mutations_never_panic_and_answers_parse_back() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(13);
        let q = query(9, "reviews.default.svc.cluster.local", TYPE_AAAA, Some(4096));
        let a = Query::parse(&q).unwrap().answer(&["fd00::1".parse().unwrap(), "fd00::2".parse().unwrap()], 30);
        for _ in 0..20_000 {
            let mut m = if rng.random() { q.clone() } else { a.clone() };
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
            m.truncate(rng.random_range(0..=m.len()));
            if let Ok(parsed) = Query::parse(&m) {
                assert!(Response::parse(&parsed.answer(&["10.0.0.1".parse().unwrap()], 1)).is_ok());
            }
            if let Ok(r) = Response::parse(&m) {
                restamp(&mut m, 1, &r.ttl_offsets, 1);
            }
        }
    }

    #[test]
    fn unusual_labels_are_forwarded_not_matched() {
        let mut q = header(1, RD, 0, 1, 0);
        q.extend_from_slice(&[3, b'a', b'.', b'b', 0, 0, 1, 0, 1]);
        assert_eq!(Query::parse(&q).unwrap().name, None);
    }
}
