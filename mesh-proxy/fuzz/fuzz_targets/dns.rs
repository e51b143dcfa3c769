//! The DNS wire format on any bytes: parsing a query or a response never panics, answers built from
//! a parsed query parse back, and aging a parsed response's TTLs stays inside the message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proxy::dns::wire::{restamp, Query, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = Query::parse(data) {
        let answer = q.answer(&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()], 30);
        assert!(Response::parse(&answer).is_ok());
        assert!(Response::parse(&q.truncated()).is_ok());
    }
    if let Ok(r) = Response::parse(data) {
        let mut copy = data.to_vec();
        restamp(&mut copy, 7, &r.ttl_offsets, 5);
    }
});
