//! One scrape target per pod: the proxy's status port serves the proxy's metrics merged with the
//! application's, as Istio's agent does.
//!
//! mesh-proxy's own metrics are on its admin API, on loopback, out of a scraper's reach; the
//! application's may be on a port the proxy captures (and, with mutual TLS, cannot be scraped in
//! plain text at all). So the pod's `prometheus.io/scrape|port|path` annotations are pointed at
//! `<status port>/stats/prometheus`, and the application's own values move, as JSON, to the
//! sidecar's `ISTIO_PROMETHEUS_ANNOTATIONS` (Istio's variable and format), from which mesh-proxy
//! finds the application's endpoint to merge. A pod that says `prometheus.io/scrape: "false"` is
//! left as it is; so is one annotated `prometheus.istio.io/merge-metrics: "false"`.

use serde_yaml::{Mapping, Value};

/// Istio's variable, read by mesh-proxy's status server.
pub const PROMETHEUS_ENV: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";
/// Where the merged metrics are served on the status port.
pub const PATH: &str = "/stats/prometheus";

const SCRAPE: &str = "prometheus.io/scrape";
const PORT: &str = "prometheus.io/port";
const PATH_KEY: &str = "prometheus.io/path";

/// The application's own scrape settings, in the order Istio's agent writes them.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Scrape {
    #[serde(skip_serializing_if = "Option::is_none")]
    scrape: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<String>,
}

/// Points the pod's annotations at the status port. Returns None when the pod opted out of
/// scraping (nothing changed), else the variable's JSON (None inside when the application had
/// no annotations of its own).
pub fn merge(annotations: &mut Mapping, status_port: u16) -> Option<Option<String>> {
    let get = |m: &Mapping, k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let own =
        Scrape { scrape: get(annotations, SCRAPE), path: get(annotations, PATH_KEY), port: get(annotations, PORT) };
    if own.scrape.as_deref().map(str::trim) == Some("false") {
        return None;
    }
    let json = (own.scrape.is_some() || own.path.is_some() || own.port.is_some())
        .then(|| serde_json::to_string(&own).expect("scrape settings serialise"));
    annotations.insert(SCRAPE.into(), "true".into());
    annotations.insert(PORT.into(), status_port.to_string().into());
    annotations.insert(PATH_KEY.into(), PATH.into());
    Some(json)
}

/// Undoes [`merge`]: the three annotations are removed and the application's own, recorded in
/// `json` by the previous injection, are put back.
pub fn restore(annotations: &mut Mapping, json: Option<&str>) -> Result<(), String> {
    for k in [SCRAPE, PORT, PATH_KEY] {
        annotations.shift_remove(k);
    }
    let Some(json) = json else { return Ok(()) };
    let own: Scrape =
        serde_json::from_str(json).map_err(|e| format!("{PROMETHEUS_ENV} of the previous sidecar is not JSON: {e}"))?;
    for (k, v) in [(SCRAPE, own.scrape), (PATH_KEY, own.path), (PORT, own.port)] {
        if let Some(v) = v {
            annotations.insert(k.into(), v.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applications_own_settings_move_to_the_variable_and_back() {
        let original: Mapping =
            serde_yaml::from_str("prometheus.io/scrape: 'true'\nprometheus.io/port: '9102'\nother: x\n").unwrap();
        let mut a = original.clone();
        let json = merge(&mut a, 15020).unwrap().unwrap();
        assert_eq!(json, r#"{"scrape":"true","port":"9102"}"#);
        assert_eq!(a[PORT], "15020");
        assert_eq!(a[PATH_KEY], "/stats/prometheus");
        restore(&mut a, Some(&json)).unwrap();
        assert_eq!(a, original);

        let mut none = Mapping::new();
        assert_eq!(merge(&mut none, 15020), Some(None));
        assert_eq!(none.len(), 3);
        let mut off: Mapping = serde_yaml::from_str("prometheus.io/scrape: 'false'\n").unwrap();
        assert_eq!(merge(&mut off, 15020), None);
        assert_eq!(off.len(), 1);
    }
}
