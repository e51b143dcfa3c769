//! Any bytes as a config file or a discovery answer: an error or a config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proxy::config::{DiscoveryResponse, RawConfig, RawRoute};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(raw) = RawConfig::from_yaml("fuzz", text) {
            if let Ok(config) = raw.validate() {
                // What validates must serialise for /config_dump.
                serde_json::to_string(&config).expect("a valid config serialises");
            }
        }
    }
    let _ = DiscoveryResponse::<RawRoute>::from_json("fuzz", data);
});
