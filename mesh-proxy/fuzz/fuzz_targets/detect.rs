//! The protocol detector on any first bytes: total, and a decision never changes with more bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proxy::data::detect::{classify, Detected};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for cut in 0..data.len() {
        match classify(&data[..cut]) {
            Detected::NeedMore => {}
            early => assert_eq!(early, whole, "decided {early:?} on {cut} bytes, {whole:?} on all"),
        }
    }
});
