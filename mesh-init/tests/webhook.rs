//! `mesh-init webhook` answering real AdmissionReview requests over TLS.
//!
//! The real binary serves with a certificate made here (rcgen: a CA and a server certificate for
//! the Service name the API server would call, `mesh-init-webhook.mesh-system.svc`); the client
//! is curl, verifying that certificate against the CA as the API server verifies it against the
//! caBundle. Every workload of `testdata/inject/` is sent as the API server would send it:
//! - the object itself: its patch is kept as a golden file (`testdata/webhook/<case>.json`,
//!   `UPDATE_GOLDEN=1` rewrites them), and the object with the patch applied must equal what
//!   `mesh-init inject` writes for it (its `.golden.yaml`);
//! - for each workload, the Pod its controller creates (owner reference, generateName, a
//!   ReplicaSet's pod-template-hash): the patched pod's spec and annotations must equal the
//!   template `mesh-init inject` writes.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use base64::Engine;
use mesh_lab::{Proc, TempDir};
use serde_json::{json, Value as Json};

const HOST: &str = "mesh-init-webhook.mesh-system.svc";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata")
}

/// A CA, and a server certificate it signed for `names`, written as PEM files.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new(names: &[&str]) -> Self {
        let dir = TempDir::new("webhook");
        let certs = Self { dir };
        certs.issue("", names);
        certs
    }

    /// Writes `<prefix>ca.pem`, `<prefix>tls.crt`, `<prefix>tls.key` from a fresh CA.
    fn issue(&self, prefix: &str, names: &[&str]) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "mesh-init test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(self.path(&format!("{prefix}ca.pem")), ca_cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{prefix}tls.crt")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{prefix}tls.key")), key.serialize_pem()).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The webhook binary, stopped on drop.
struct Webhook {
    _proc: Proc,
    port: u16,
}

impl Webhook {
    fn start(certs: &Certs, args: &[&str]) -> Self {
        let mut proc = Proc::spawn(
            Command::new(env!("CARGO_BIN_EXE_mesh-init"))
                .arg("webhook")
                .arg("--tls-cert")
                .arg(certs.path("tls.crt"))
                .arg("--tls-key")
                .arg(certs.path("tls.key"))
                .args(["--listen", "127.0.0.1:0"])
                .args(args),
        );
        // Its first line names the address it listens on.
        let line = proc.wait_for_line("");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("mesh-init webhook {args:?} did not start: {line:?}"));
        Self { _proc: proc, port }
    }
}

/// `curl` against the webhook as the API server would call it: HTTPS to the Service name,
/// verified against `ca`. Returns (HTTP status, body), or the status 0 and curl's error.
fn curl(hook: &Webhook, ca: &Path, method: &str, path: &str, content_type: &str, body: &str) -> (u16, String) {
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{HOST}:{}:127.0.0.1", hook.port))
        .args(["-H", &format!("Content-Type: {content_type}"), "--data-binary", "@-"])
        .arg(format!("https://{HOST}:{}{path}", hook.port))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs (Debian package curl)");
    if method != "GET" {
        child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.rsplit_once('\n') {
        Some((body, code)) if out.status.success() => (code.trim().parse().unwrap_or(0), body.to_string()),
        _ => (0, String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn review(uid: &str, object: &Json) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": object["kind"]},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "dryRun": false,
        }
    })
    .to_string()
}

/// Sends `object` for admission; returns the response and the patched object.
fn admit(hook: &Webhook, ca: &Path, uid: &str, object: &Json) -> (Json, Json) {
    let (status, body) = curl(hook, ca, "POST", "/inject", "application/json", &review(uid, object));
    assert_eq!(status, 200, "{uid}: {body}");
    let answer: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{uid}: {e}: {body}"));
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], uid);
    let mut patched = object.clone();
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(patch).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{uid}: the patch does not apply: {e}"));
    }
    (response, patched)
}

fn header<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(&format!("# {key}:")).map(str::trim))
}

/// The documents of a YAML file, as JSON; `v1/List` items are spread out.
fn objects(path: &Path) -> Vec<Json> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = vec![];
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        let json: Json = serde_json::to_value(&value).unwrap();
        if json["kind"] == "List" {
            out.extend(json["items"].as_array().unwrap().iter().cloned());
        } else if !json.is_null() {
            out.push(json);
        }
    }
    out
}

/// The injection cases, grouped by their `# args:` line (one webhook per group).
fn cases() -> BTreeMap<String, Vec<PathBuf>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(testdata().join("inject"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.to_string_lossy().ends_with(".golden.yaml"))
        .collect();
    files.sort();
    for f in files {
        let args = header(&std::fs::read_to_string(&f).unwrap(), "args").unwrap_or_default().to_string();
        out.entry(args).or_default().push(f);
    }
    out
}

/// Where `object`'s pod template is, as a JSON pointer; None for kinds without one (a custom
/// resource called Deployment included).
fn template_of(object: &Json) -> Option<String> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    mesh_init::inject::template_path(api_version, kind).map(|p| p.iter().map(|k| format!("/{k}")).collect())
}

fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            Some("/spec/template")
        }
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

#[test]
fn every_workload_kind_gets_the_patch_inject_would_make() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let certs = Certs::new(&[HOST]);
    let ca = certs.path("ca.pem");
    let mut failed = vec![];
    let mut kinds = std::collections::BTreeSet::new();
    for (args, files) in cases() {
        let hook = Webhook::start(&certs, &args.split_whitespace().collect::<Vec<_>>());
        for file in files {
            let case = file.file_stem().unwrap().to_string_lossy().into_owned();
            let injected = objects(&file.with_extension("golden.yaml"));
            let mut record = vec![];
            for (i, object) in objects(&file).iter().enumerate() {
                let kind = object["kind"].as_str().unwrap_or_default().to_string();
                if template_of(object).is_none() {
                    continue;
                }
                kinds.insert(kind.clone());
                let name = object.pointer("/metadata/name").and_then(Json::as_str).unwrap_or("-");
                let (response, patched) = admit(&hook, &ca, &format!("{case}-{i}"), object);
                if patched != injected[i] {
                    failed.push(format!("{case}: {kind} {name}: the patched object differs from inject's output"));
                }
                let patch = response["patch"].as_str().map(|p| {
                    serde_json::from_slice::<Json>(&base64::engine::general_purpose::STANDARD.decode(p).unwrap())
                        .unwrap()
                });
                record.push(json!({
                    "object": format!("{kind}/{name}"),
                    "allowed": response["allowed"],
                    "warnings": response.get("warnings").cloned().unwrap_or(json!([])),
                    "patch": patch,
                }));
            }
            let golden = testdata().join("webhook").join(format!("{case}.json"));
            let text = serde_json::to_string_pretty(&record).unwrap() + "\n";
            if update {
                std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
                std::fs::write(&golden, &text).unwrap();
            } else if std::fs::read_to_string(&golden).unwrap_or_default() != text {
                failed.push(format!("{} differs (UPDATE_GOLDEN=1 rewrites it):\n{text}", golden.display()));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let want = ["CronJob", "DaemonSet", "Deployment", "Job", "Pod", "ReplicaSet", "StatefulSet"];
    assert!(want.iter().all(|k| kinds.contains(*k)), "kinds covered: {kinds:?}");
}

/// The Pod a controller creates from `workload`'s template, as the API server admits it: no
/// name yet (generateName), an owner reference, a ReplicaSet's pod-template-hash label.
fn pod_of(workload: &Json) -> Json {
    let kind = workload["kind"].as_str().unwrap();
    let name = workload["metadata"]["name"].as_str().unwrap();
    let template = workload.pointer(template_pointer(kind).unwrap()).unwrap();
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"].clone(), "spec": template["spec"].clone()});
    if pod["metadata"].is_null() {
        pod["metadata"] = json!({});
    }
    let (owner_kind, owner) = match kind {
        "Deployment" => {
            pod["metadata"]["labels"]["pod-template-hash"] = json!("5f7c9b8d4");
            ("ReplicaSet", format!("{name}-5f7c9b8d4"))
        }
        "CronJob" => ("Job", format!("{name}-29000000")),
        other => (other, name.to_string()),
    };
    pod["metadata"]["generateName"] = json!(format!("{owner}-"));
    pod["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": owner_kind, "name": owner, "uid": "1", "controller": true}]);
    pod
}

#[test]
fn pods_created_by_a_workload_get_what_inject_writes_in_its_template() {
    let certs = Certs::new(&[HOST]);
    let ca = certs.path("ca.pem");
    let mut seen = 0;
    for (args, files) in cases() {
        let hook = Webhook::start(&certs, &args.split_whitespace().collect::<Vec<_>>());
        for file in files {
            let injected = objects(&file.with_extension("golden.yaml"));
            for (i, workload) in objects(&file).iter().enumerate() {
                let kind = workload["kind"].as_str().unwrap_or_default();
                // A CronJob's pods are owned by Jobs named after the schedule: the webhook
                // cannot name the ConfigMap after the CronJob (deploy/README.md), so skip them.
                if matches!(template_of(workload).as_deref(), None | Some("")) || kind == "CronJob" {
                    continue;
                }
                // Annotations on the workload itself are read by `mesh-init inject` only: its
                // pods do not carry them (deploy/README.md says to annotate the template).
                let own = workload.pointer("/metadata/annotations").and_then(Json::as_object);
                if own.is_some_and(|a| a.keys().any(|k| k.contains("mesh-init.io/") || k.contains("istio.io/"))) {
                    continue;
                }
                let (_, patched) = admit(&hook, &ca, &format!("pod-{i}"), &pod_of(workload));
                let want = injected[i].pointer(template_pointer(kind).unwrap()).unwrap();
                let case = file.display();
                assert_eq!(patched["spec"], want["spec"], "{case}: {kind}'s pod: spec");
                assert_eq!(
                    patched["metadata"]["annotations"], want["metadata"]["annotations"],
                    "{case}: {kind}'s pod: annotations"
                );
                seen += 1;
            }
        }
    }
    assert!(seen >= 8, "only {seen} workloads");
}

#[test]
fn refusals_opt_outs_and_injected_pods() {
    let certs = Certs::new(&[HOST]);
    let ca = certs.path("ca.pem");
    let hook = Webhook::start(&certs, &[]);
    let pod = |annotations: Json, labels: Json| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "namespace": "default", "annotations": annotations, "labels": labels},
               "spec": {"containers": [{"name": "web", "image": "nginx"}]}})
    };

    // A bad annotation: refused with the sentence `mesh-init inject` prints.
    let (r, _) =
        admit(&hook, &ca, "bad", &pod(json!({"traffic.sidecar.istio.io/excludeInboundPorts": "99999"}), json!({})));
    assert_eq!(r["allowed"], false);
    let message = r["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "namespace default: Pod web: annotation traffic.sidecar.istio.io/excludeInboundPorts: invalid value \"99999\""
        ),
        "{message}"
    );
    assert_eq!(r["status"]["code"], 400);

    // Opted out by Istio's label, and by our annotation: admitted unchanged, with the reason.
    for (annotations, labels) in
        [(json!({}), json!({"sidecar.istio.io/inject": "false"})), (json!({"mesh-init.io/inject": "false"}), json!({}))]
    {
        let (r, patched) = admit(&hook, &ca, "out", &pod(annotations.clone(), labels.clone()));
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none(), "{r}");
        assert_eq!(patched, pod(annotations, labels));
        assert!(r["warnings"][0].as_str().unwrap().contains("left as is"), "{r}");
    }

    // An injected pod (from a template `mesh-init inject` wrote) keeps its injection.
    let (_, injected) = admit(&hook, &ca, "first", &pod(json!({}), json!({})));
    let (r, again) = admit(&hook, &ca, "again", &injected);
    assert!(r.get("patch").is_none(), "{r}");
    assert_eq!(again, injected);
    assert!(r["warnings"][0].as_str().unwrap().contains("mesh-init.io/status is already set"), "{r}");

    // Anything but CREATE passes untouched.
    let mut update: Json = serde_json::from_str(&review("upd", &pod(json!({}), json!({})))).unwrap();
    update["request"]["operation"] = json!("UPDATE");
    let (status, body) = curl(&hook, &ca, "POST", "/inject", "application/json", &update.to_string());
    assert_eq!(status, 200);
    let r: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"].get("patch").is_none());
}

#[test]
fn http_errors_name_what_was_wrong() {
    let certs = Certs::new(&[HOST]);
    let ca = certs.path("ca.pem");
    let hook = Webhook::start(&certs, &[]);
    assert_eq!(curl(&hook, &ca, "GET", "/ready", "text/plain", ""), (200, "ready\n".into()));
    let (status, body) = curl(&hook, &ca, "POST", "/inject", "text/plain", "{}");
    assert_eq!((status, body.as_str()), (415, "expected Content-Type: application/json\n"));
    let (status, body) = curl(&hook, &ca, "POST", "/inject", "application/json", "{not json");
    assert_eq!(status, 400);
    assert!(body.starts_with("the body is not an AdmissionReview"), "{body}");
    let (status, body) = curl(
        &hook,
        &ca,
        "POST",
        "/inject",
        "application/json",
        r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("expected admission.k8s.io/v1 AdmissionReview"), "{body}");
    assert_eq!(curl(&hook, &ca, "POST", "/mutate", "application/json", "{}").0, 404);

    // Plain HTTP on the TLS port gets no answer; a certificate for another name is refused by
    // the client, as the API server would refuse it.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{}/ready", hook.port)])
        .output()
        .unwrap();
    assert!(!plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("ready"));
    let other = Certs::new(&["other.mesh-system.svc"]);
    let other_hook = Webhook::start(&other, &[]);
    let (status, error) = curl(&other_hook, &other.path("ca.pem"), "GET", "/ready", "text/plain", "");
    assert_eq!(status, 0);
    assert!(error.contains("certificate") || error.contains("SSL"), "{error}");
}

#[test]
fn a_renewed_certificate_is_used_and_a_broken_one_is_not() {
    let certs = Certs::new(&[HOST]);
    let hook = Webhook::start(&certs, &[]);
    assert_eq!(curl(&hook, &certs.path("ca.pem"), "GET", "/ready", "text/plain", "").0, 200);

    // Renewed from another CA (as when a Secret is rotated): the next handshake presents it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    certs.issue("", &[HOST]);
    assert_eq!(curl(&hook, &certs.path("ca.pem"), "GET", "/ready", "text/plain", "").0, 200);

    // Half written: the key is not there yet. The previous certificate stays in use.
    certs.issue("next-", &[HOST]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::copy(certs.path("next-tls.crt"), certs.path("tls.crt")).unwrap();
    assert_eq!(curl(&hook, &certs.path("ca.pem"), "GET", "/ready", "text/plain", "").0, 200);
    assert_eq!(curl(&hook, &certs.path("next-ca.pem"), "GET", "/ready", "text/plain", "").0, 0);
    // The key arrives: now the new pair is served.
    std::fs::copy(certs.path("next-tls.key"), certs.path("tls.key")).unwrap();
    assert_eq!(curl(&hook, &certs.path("next-ca.pem"), "GET", "/ready", "text/plain", "").0, 200);
}

#[test]
fn unusable_certificates_stop_the_start_naming_the_file() {
    let certs = Certs::new(&[HOST]);
    std::fs::write(certs.path("tls.key"), "not a key").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-init"))
        .arg("webhook")
        .arg("--tls-cert")
        .arg(certs.path("tls.crt"))
        .arg("--tls-key")
        .arg(certs.path("tls.key"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("--tls-key {}", certs.path("tls.key").display())), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-init"))
        .args(["webhook", "--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert /nonexistent.crt"));
}
