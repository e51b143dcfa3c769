//! Where a workload keeps its pod template, and putting a [`Sidecar`] into it (or taking a
//! previous one out).

use serde_yaml::{Mapping, Value};

use super::{
    annotations::STATUS,
    containers::{Sidecar, Status, BPFFS_VOLUME, CGROUP_VOLUME, CONFIG_VOLUME, INIT_NAME, PROXY_NAME},
};

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

/// Removes what a previous injection added (as its status annotation lists it), or, when there
/// was none, refuses a pod that already uses the injector's names.
pub fn strip(template: &mut Value, previous: Option<&str>) -> Result<(), String> {
    let spec = template.get_mut("spec").and_then(Value::as_mapping_mut).expect("check_template passed");
    let Some(previous) = previous else {
        let owned = [INIT_NAME, PROXY_NAME, CONFIG_VOLUME, CGROUP_VOLUME, BPFFS_VOLUME];
        for list in ["initContainers", "containers", "volumes"] {
            if let Some(name) = names(spec, list).into_iter().find(|n| owned.contains(&n.as_str())) {
                return Err(format!(
                    "spec.{list} already has {name:?} but there is no {STATUS} annotation: it was not added by \
                     `mesh-init inject`; rename it, or remove it to inject"
                ));
            }
        }
        return Ok(());
    };
    let status: Status = serde_json::from_str(previous)
        .map_err(|e| format!("annotation {STATUS}: {previous:?} is not what `mesh-init inject` writes ({e})"))?;
    for (list, gone) in
        [("initContainers", &status.init_containers), ("containers", &status.containers), ("volumes", &status.volumes)]
    {
        if let Some(Value::Sequence(items)) = spec.get_mut(list) {
            items.retain(|item| !item.get("name").and_then(Value::as_str).is_some_and(|n| gone.iter().any(|g| g == n)));
            if items.is_empty() && list != "containers" {
                spec.shift_remove(list);
            }
        }
    }
    if let Some(Value::Mapping(annotations)) = get_mut(template, &["metadata", "annotations"]) {
        annotations.shift_remove(STATUS);
    }
    Ok(())
}

fn names(spec: &Mapping, list: &str) -> Vec<String> {
    match spec.get(list) {
        Some(Value::Sequence(items)) => {
            items.iter().filter_map(|i| i.get("name").and_then(Value::as_str)).map(str::to_string).collect()
        }
        _ => vec![],
    }
}

/// Adds the sidecar to a template that has none. The classic sidecar's init container runs after
/// the application's (which therefore run uncaptured, as they did before the mesh); a native
/// sidecar and its init container run first, so later init containers already have the proxy.
pub fn apply(template: &mut Value, sidecar: &Sidecar) {
    let init = to_value(&sidecar.init_container());
    let proxy = to_value(&sidecar.proxy_container());
    let spec = template.get_mut("spec").and_then(Value::as_mapping_mut).expect("check_template passed");
    if !spec.contains_key("initContainers") {
        // Where a reader looks for it: just before `containers`.
        let rest = std::mem::take(spec);
        for (k, v) in rest {
            if k.as_str() == Some("containers") {
                spec.insert("initContainers".into(), Value::Sequence(vec![]));
            }
            spec.insert(k, v);
        }
    }
    if sidecar.native {
        sequence(spec, "initContainers").splice(0..0, [init, proxy]);
    } else {
        sequence(spec, "initContainers").push(init);
        sequence(spec, "containers").push(proxy);
    }
    sequence(spec, "volumes").extend(sidecar.volumes().iter().map(to_value));

    let status = serde_json::to_string(&sidecar.status()).expect("the status serialises");
    let template = template.as_mapping_mut().expect("check_template passed");
    if !matches!(template.get("metadata"), Some(Value::Mapping(_))) {
        // Put `metadata` before `spec`, where a reader expects it.
        let rest = std::mem::take(template);
        template.insert("metadata".into(), Value::Mapping(Mapping::new()));
        template.extend(rest.into_iter().filter(|(k, _)| k.as_str() != Some("metadata")));
    }
    let metadata = mapping(template, "metadata");
    mapping(metadata, "annotations").insert(STATUS.into(), status.into());
}

/// The sequence under `key`, created (at the end) when absent or not a sequence.
fn sequence<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    let slot = map.entry(key.into()).or_insert(Value::Null);
    if !slot.is_sequence() {
        *slot = Value::Sequence(vec![]);
    }
    slot.as_sequence_mut().expect("made a sequence above")
}

/// The mapping under `key`, created (at the end) when absent or not a mapping.
fn mapping<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let slot = map.entry(key.into()).or_insert(Value::Null);
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut().expect("made a mapping above")
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_yaml::to_value(v).expect("the injected types serialise")
}
