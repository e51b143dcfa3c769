//! Upstream answers kept for their TTL: the smallest TTL of their answer and authority records
//! (an NXDOMAIN or NODATA answer lasts as long as its SOA record says). A copy handed out has the
//! asker's ID and every TTL aged by the time it spent here.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::wire::{self, Query, Response, RCODE_NOERROR, RCODE_NXDOMAIN};

/// Answers kept at most; when full, the expired ones are dropped, and if that is not enough the
/// whole cache (a bound on memory, not an LRU: a pod asks for few names).
const MAX_ENTRIES: usize = 4096;
/// An answer is kept at most this long, whatever its TTL.
const MAX_TTL: u32 = 3600;

/// The question an answer is for. EDNS is part of it: an answer to a query with EDNS carries an
/// OPT record a query without it must not get.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    name: String,
    qtype: u16,
    qclass: u16,
    edns: bool,
}

impl Key {
    fn of(q: &Query) -> Option<Key> {
        Some(Key { name: q.name.clone()?, qtype: q.qtype, qclass: q.qclass, edns: q.edns_size.is_some() })
    }
}

struct Entry {
    message: Vec<u8>,
    ttl_offsets: Vec<usize>,
    stored: Instant,
    expires: Instant,
}

#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl Cache {
    /// A fresh copy of the answer to `q`, if one is stored and has not expired.
    pub fn get(&self, q: &Query, now: Instant) -> Option<Vec<u8>> {
        let key = Key::of(q)?;
        let entries = self.entries.lock().expect("dns cache lock poisoned");
        let e = entries.get(&key).filter(|e| e.expires > now)?;
        let mut message = e.message.clone();
        let age = now.duration_since(e.stored).as_secs().min(u64::from(u32::MAX)) as u32;
        wire::restamp(&mut message, q.id, &e.ttl_offsets, age);
        Some(message)
    }

    /// Keeps `message`, the upstream's complete answer to `q`, if it says how long it holds.
    pub fn put(&self, q: &Query, message: &[u8], parsed: &Response, now: Instant) {
        let (Some(key), Some(ttl)) = (Key::of(q), parsed.min_ttl) else { return };
        if parsed.truncated || ttl == 0 || !matches!(parsed.rcode, RCODE_NOERROR | RCODE_NXDOMAIN) {
            return;
        }
        let expires = now + Duration::from_secs(u64::from(ttl.min(MAX_TTL)));
        let mut entries = self.entries.lock().expect("dns cache lock poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        let entry = Entry { message: message.to_vec(), ttl_offsets: parsed.ttl_offsets.clone(), stored: now, expires };
        entries.insert(key, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str) -> Query {
        let mut q = vec![(id >> 8) as u8, id as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        Query::parse(&q).unwrap()
    }

    #[test]
    fn kept_for_the_ttl_with_the_askers_id_and_aged_ttls() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let q = query(1, "example.org");
        let answer = q.answer(&["192.0.2.1".parse().unwrap()], 10);
        cache.put(&q, &answer, &Response::parse(&answer).unwrap(), t0);
        let again = query(2, "EXAMPLE.org");
        let hit = cache.get(&again, t0 + Duration::from_secs(4)).expect("cached");
        let r = Response::parse(&hit).unwrap();
        assert_eq!((r.id, r.min_ttl), (2, Some(6)));
        assert!(cache.get(&again, t0 + Duration::from_secs(10)).is_none(), "expired with its TTL");
        // Nothing says how long a record-less answer holds: not kept.
        let q = query(3, "nodata.example.org");
        let empty = q.answer(&[], 10);
        cache.put(&q, &empty, &Response::parse(&empty).unwrap(), t0);
        assert!(cache.get(&q, t0).is_none());
    }
}
