//! The application's probes, answered through the proxy's status port, as Istio's injector does.
//!
//! Without this, the kubelet's HTTP and TCP probes arrive on the pod IP like any client, are
//! captured, and pass through the proxy: the application's liveness then depends on the proxy's,
//! and a probe the proxy cannot route fails. Each HTTP or TCP probe of an application container
//! on a captured port becomes `GET /app-health/<container>/readyz|livez|startupz` on the status
//! port (15020, excluded from capture), and the original handler goes, as JSON, into the
//! sidecar's `ISTIO_KUBE_APP_PROBERS` (Istio's variable and format), from which mesh-proxy makes
//! the real probe. Timing fields (period, thresholds, timeout) stay on the rewritten probe.
//!
//! A second injection first puts the original handlers back from the previous sidecar's variable,
//! so re-injecting gives what injecting once gave. Named ports are resolved to numbers in the
//! variable (mesh-proxy does not see the container's port names), so that is also what comes back.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

/// Istio's variable, read by mesh-proxy's status server.
pub const PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";

/// Probe field, and the last part of its URL on the status port.
const KINDS: [(&str, &str); 3] =
    [("readinessProbe", "readyz"), ("livenessProbe", "livez"), ("startupProbe", "startupz")];
/// The handlers that are rewritten; `exec` runs in the container and needs nothing, gRPC and
/// HTTPS probes are left to pass through the proxy (mesh-proxy's status server makes plain HTTP
/// and TCP probes only).
const REWRITTEN: [&str; 2] = ["httpGet", "tcpSocket"];

/// The path the kubelet will ask for.
pub fn url(container: &str, suffix: &str) -> String {
    format!("/app-health/{container}/{suffix}")
}

/// Rewrites every HTTP and TCP probe of the pod's containers except `skip` (the injected ones)
/// whose port `captured` says is captured. Returns the variable's JSON (None when nothing was
/// rewritten) and a note per probe left alone for a reason the user should know.
pub fn rewrite(
    spec: &mut Mapping,
    skip: &[&str],
    status_port: u16,
    captured: &dyn Fn(u16) -> bool,
) -> (Option<String>, Vec<String>) {
    let mut probers: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut notes = vec![];
    for list in ["initContainers", "containers"] {
        let Some(Value::Sequence(containers)) = spec.get_mut(list) else { continue };
        for c in containers.iter_mut() {
            let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_string) else { continue };
            if skip.contains(&name.as_str()) {
                continue;
            }
            let ports = named_ports(c);
            for (field, suffix) in KINDS {
                let Some(Value::Mapping(probe)) = c.get_mut(field) else { continue };
                if probe.contains_key("grpc") {
                    notes.push(format!(
                        "container {name}: the gRPC {field} is not rewritten; it reaches the application through the proxy"
                    ));
                    continue;
                }
                let Some(handler) = REWRITTEN.iter().find(|h| probe.contains_key(**h)).copied() else { continue };
                let scheme = probe.get("httpGet").and_then(|g| g.get("scheme")).and_then(Value::as_str);
                if scheme.is_some_and(|s| !s.eq_ignore_ascii_case("HTTP")) {
                    notes.push(format!(
                        "container {name}: the HTTPS {field} is not rewritten (mesh-proxy's status server probes over \
                         HTTP only); it reaches the application through the proxy"
                    ));
                    continue;
                }
                let mut action = probe[handler].clone();
                let port = match action.get("port") {
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Some(Value::String(p)) => ports.get(p.as_str()).copied(),
                    _ => None,
                };
                let Some(port) = port else {
                    notes.push(format!(
                        "container {name}: {field} names a port the container does not declare; left as is"
                    ));
                    continue;
                };
                if !captured(port) {
                    continue;
                }
                action.as_mapping_mut().expect("a handler is a mapping").insert("port".into(), port.into());
                let mut prober = serde_json::Map::new();
                prober.insert(handler.into(), serde_json::to_value(&action).expect("YAML values convert to JSON"));
                if let Some(timeout) = probe.get("timeoutSeconds").and_then(Value::as_u64) {
                    prober.insert("timeoutSeconds".into(), timeout.into());
                }
                let path = url(&name, suffix);
                probers.insert(path.clone(), prober.into());
                let mut get = Mapping::new();
                get.insert("path".into(), path.into());
                get.insert("port".into(), status_port.into());
                *probe = replace_handler(probe, handler, "httpGet", Value::Mapping(get));
            }
        }
    }
    let json = (!probers.is_empty()).then(|| serde_json::to_string(&probers).expect("probers serialise"));
    (json, notes)
}

/// Puts back the handlers a previous injection recorded in `json` (its sidecar's variable).
pub fn restore(spec: &mut Mapping, json: &str) -> Result<(), String> {
    let probers: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(json).map_err(|e| format!("{PROBERS_ENV} of the previous sidecar is not JSON: {e}"))?;
    for (path, prober) in probers {
        let Some((container, suffix)) = path.strip_prefix("/app-health/").and_then(|rest| rest.split_once('/')) else {
            return Err(format!("{PROBERS_ENV}: {path:?} is not an /app-health/<container>/<probe> path"));
        };
        let Some((field, _)) = KINDS.iter().find(|(_, s)| *s == suffix) else {
            return Err(format!("{PROBERS_ENV}: {path:?} names no probe"));
        };
        let Some((handler, action)) = prober.iter().find(|(k, _)| REWRITTEN.contains(&k.as_str())) else {
            return Err(format!("{PROBERS_ENV}: {path:?} has no httpGet or tcpSocket"));
        };
        let action: Value = serde_yaml::to_value(action).expect("JSON values convert to YAML");
        for list in ["initContainers", "containers"] {
            let Some(Value::Sequence(containers)) = spec.get_mut(list) else { continue };
            let found = containers.iter_mut().find(|c| c.get("name").and_then(Value::as_str) == Some(container));
            if let Some(Value::Mapping(probe)) = found.and_then(|c| c.get_mut(*field)) {
                if probe.contains_key("httpGet") {
                    *probe = replace_handler(probe, "httpGet", handler, action.clone());
                }
            }
        }
    }
    Ok(())
}

/// `probe` with the `from` handler replaced by `to: value`, in the same position.
fn replace_handler(probe: &Mapping, from: &str, to: &str, value: Value) -> Mapping {
    let mut out = Mapping::new();
    for (k, v) in probe {
        if k.as_str() == Some(from) {
            out.insert(to.into(), value.clone());
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn named_ports(container: &Value) -> BTreeMap<String, u16> {
    let mut out = BTreeMap::new();
    if let Some(Value::Sequence(ports)) = container.get("ports") {
        for p in ports {
            let name = p.get("name").and_then(Value::as_str);
            let port = p.get("containerPort").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok());
            if let (Some(name), Some(port)) = (name, port) {
                out.insert(name.to_string(), port);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Mapping {
        serde_yaml::from_str(
            r#"
containers:
- name: web
  ports: [{name: http, containerPort: 8080}]
  readinessProbe: {httpGet: {path: /ready, port: http, scheme: HTTP}, periodSeconds: 3, timeoutSeconds: 2}
  livenessProbe: {tcpSocket: {port: 8080}, failureThreshold: 5}
  startupProbe: {exec: {command: [true]}}
- name: admin
  livenessProbe: {httpGet: {path: /, port: 9901}}
- name: mesh-proxy
  readinessProbe: {httpGet: {path: /ready, port: 15021}}
"#,
        )
        .unwrap()
    }

    #[test]
    fn http_and_tcp_probes_go_to_the_status_port_and_come_back() {
        let original = spec();
        let mut s = original.clone();
        let (json, notes) = rewrite(&mut s, &["mesh-proxy"], 15020, &|p| p != 9901);
        assert!(notes.is_empty(), "{notes:?}");
        let json = json.unwrap();
        assert_eq!(
            json,
            r#"{"/app-health/web/livez":{"tcpSocket":{"port":8080}},"/app-health/web/readyz":{"httpGet":{"path":"/ready","port":8080,"scheme":"HTTP"},"timeoutSeconds":2}}"#
        );
        let web = &s["containers"][0];
        assert_eq!(web["readinessProbe"]["httpGet"]["path"], "/app-health/web/readyz");
        assert_eq!(web["readinessProbe"]["httpGet"]["port"], 15020);
        assert_eq!(web["readinessProbe"]["periodSeconds"], 3);
        assert_eq!(web["livenessProbe"]["httpGet"]["path"], "/app-health/web/livez");
        assert!(web["livenessProbe"].get("tcpSocket").is_none());
        assert_eq!(web["startupProbe"], original["containers"][0]["startupProbe"], "exec is left alone");
        assert_eq!(s["containers"][1], original["containers"][1], "an excluded port is not captured");
        assert_eq!(s["containers"][2], original["containers"][2], "the sidecar is skipped");

        restore(&mut s, &json).unwrap();
        let mut want = original.clone();
        want["containers"][0]["readinessProbe"]["httpGet"]["port"] = 8080.into();
        assert_eq!(s, want);
    }

    #[test]
    fn grpc_and_https_probes_and_unknown_port_names_are_noted() {
        let mut s: Mapping = serde_yaml::from_str(
            "containers:\n- {name: g, readinessProbe: {grpc: {port: 9000}}, livenessProbe: {httpGet: {port: nope}},\n   startupProbe: {httpGet: {port: 443, scheme: HTTPS}}}\n",
        )
        .unwrap();
        let (json, notes) = rewrite(&mut s, &[], 15020, &|_| true);
        assert!(json.is_none());
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("gRPC readinessProbe"));
        assert!(notes[1].contains("does not declare"));
        assert!(notes[2].contains("HTTPS startupProbe"));
    }
}
