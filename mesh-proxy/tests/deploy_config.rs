//! The sidecar config in deploy/'s example ConfigMaps is one mesh-proxy accepts, with the admin
//! API on loopback and the readiness port the injected probe targets (15021) on all addresses.

use std::path::Path;

use mesh_proxy::config::RawConfig;
use serde::Deserialize;

#[test]
fn example_configmaps_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for example in ["deploy/iptables/productpage.yaml", "deploy/ebpf/productpage.yaml"] {
        let text = std::fs::read_to_string(root.join(example)).unwrap();
        let config = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
            .find(|doc| doc["kind"] == "ConfigMap")
            .and_then(|cm| cm["data"]["config.yaml"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("{example}: no ConfigMap with data.config.yaml"));
        let c = RawConfig::from_yaml(example, &config).and_then(|r| r.validate()).unwrap().bootstrap;
        assert_eq!(c.admin, "127.0.0.1:15090".parse().unwrap(), "{example}");
        assert_eq!(c.readiness.map(|r| r.address), Some("0.0.0.0:15021".parse().unwrap()), "{example}");
    }
}
