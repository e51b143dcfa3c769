//! Where a workload keeps its pod template, and what it is called.

use serde_yaml::Value;

/// The path from the object to its pod template (`metadata` + `spec`), for the kinds that have
/// one; `None` for every other kind, which passes through untouched. The group is checked so a
/// custom resource that happens to be called `Deployment` is left alone.
pub fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        // A Pod is its own template.
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController") | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some(&["spec", "template"])
        }
        ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

pub fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.get(k))
}

pub fn get_mut<'a>(value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, k| v.get_mut(k))
}

pub fn get_str<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(value, path).and_then(Value::as_str)
}

/// Checks that `template` has a pod spec with containers; the reason names the missing field.
pub fn check_template(template: Option<&Value>, path: &[&str]) -> Result<(), String> {
    let at = |field: &str| if path.is_empty() { field.to_string() } else { format!("{}.{field}", path.join(".")) };
    let Some(template) = template.filter(|t| t.is_mapping()) else {
        return Err(format!("{} is missing: a workload of this kind needs a pod template", path.join(".")));
    };
    match template.get("spec") {
        Some(spec) if spec.is_mapping() => {}
        _ => return Err(format!("{} is missing or not a mapping", at("spec"))),
    }
    match get(template, &["spec", "containers"]) {
        Some(Value::Sequence(c)) if !c.is_empty() => Ok(()),
        _ => Err(format!("{} is missing or empty", at("spec.containers"))),
    }
}

/// The name of the workload a pod template belongs to: a workload's own name; for a Pod, its
/// controller's (a ReplicaSet's without its pod-template-hash suffix, which is the Deployment's),
/// else its name, else its generateName. The admission webhook sees a Deployment's pods, not the
/// Deployment, and must name the ConfigMap as `mesh-init inject` does for the Deployment.
/// (A CronJob's pods are owned by Jobs named `<cronjob>-<time>`, which cannot be told from a
/// Job's own name: annotate those templates with mesh-init.io/configMap.)
pub fn workload_name(obj: &Value, kind: &str) -> Option<String> {
    if kind != "Pod" {
        return get_str(obj, &["metadata", "name"]).map(str::to_string);
    }
    let owner = get(obj, &["metadata", "ownerReferences"]).and_then(Value::as_sequence).and_then(|owners| {
        owners.iter().find(|o| o.get("controller").and_then(Value::as_bool) == Some(true)).or(owners.first())
    });
    if let Some(owner) = owner {
        let name = owner.get("name").and_then(Value::as_str).unwrap_or_default();
        let hash = get_str(obj, &["metadata", "labels", "pod-template-hash"]);
        let kind = owner.get("kind").and_then(Value::as_str);
        return match (kind, hash) {
            (Some("ReplicaSet"), Some(hash)) => name.strip_suffix(&format!("-{hash}")).unwrap_or(name),
            _ => name,
        }
        .to_string()
        .into();
    }
    get_str(obj, &["metadata", "name"])
        .or_else(|| get_str(obj, &["metadata", "generateName"]).map(|g| g.trim_end_matches('-')))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}
