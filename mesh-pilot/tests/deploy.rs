//! deploy/mesh-pilot/: valid Kubernetes objects (`kubernetes-validate --strict`, offline schemas),
//! RBAC granting list and watch on exactly what the Kubernetes adapter watches, and our CRD's
//! schema matching the LocalRateLimit type.

use std::{collections::BTreeSet, path::PathBuf, process::Command, sync::Arc};

use mesh_pilot::{
    adapter::kube,
    ratelimit::LocalRateLimit,
    resource::{self, Body, Origin},
    yaml,
};
use serde_json::Value;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/mesh-pilot").join(file)
}

fn docs(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    yaml::documents(file, &text).unwrap().into_iter().map(|d| d.value).collect()
}

#[test]
fn manifests_match_the_kubernetes_schema() {
    let version = Command::new("kubernetes-validate").arg("--version").output();
    if !version.as_ref().is_ok_and(|o| o.status.success()) {
        let why = "kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)";
        assert!(std::env::var_os("CI").is_none(), "{why}; CI is set, so the schema check may not be skipped");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args([deploy("mesh-pilot.yaml"), deploy("crds.yaml")])
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !report.contains("ERROR"), "kubernetes-validate --strict:\n{report}");
}

#[test]
fn rbac_is_list_and_watch_on_exactly_what_is_watched() {
    let role = docs("mesh-pilot.yaml").into_iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs: Vec<&str> = rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(verbs, ["list", "watch"], "{rule}");
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                granted.insert((g.as_str().unwrap().to_string(), r.as_str().unwrap().to_string()));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = kube::watched("v1").into_iter().collect();
    assert_eq!(granted, watched);
}

#[test]
fn the_local_rate_limit_crd_schema_is_the_types() {
    let crd = docs("crds.yaml").into_iter().find(|d| d["spec"]["names"]["kind"] == "LocalRateLimit").unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let properties: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
    let required: BTreeSet<String> =
        schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let full = LocalRateLimit {
        host: "reviews".into(),
        port: Some(9080),
        max_tokens: 10,
        tokens_per_fill: Some(5),
        fill_interval: "1s".into(),
    };
    let fields: BTreeSet<String> = serde_json::to_value(&full).unwrap().as_object().unwrap().keys().cloned().collect();
    assert_eq!(properties, fields);
    let minimal: LocalRateLimit =
        serde_json::from_value(serde_json::json!({"host": "reviews", "maxTokens": 1, "fillInterval": "1s"})).unwrap();
    let minimal: BTreeSet<String> =
        serde_json::to_value(&minimal).unwrap().as_object().unwrap().keys().cloned().collect();
    assert_eq!(required, minimal);

    // An object as a user would apply it parses with our strict reader.
    let obj = serde_json::json!({"apiVersion": "policy.mesh-init.io/v1alpha1", "kind": "LocalRateLimit",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"host": "reviews", "maxTokens": 100, "fillInterval": "1s"}});
    let parsed = resource::parse(obj, &Arc::new(Origin::default())).remove(0).unwrap();
    assert!(matches!(parsed.body, Body::LocalRateLimit(_)));
}
