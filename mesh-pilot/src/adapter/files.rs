//! The files adapter (`--config-dir DIR`): every `*.yaml`, `*.yml` and `*.json` file of the
//! directory (not its subdirectories, as `kubectl apply -f DIR`), any mix of Kubernetes-format
//! documents, watched with inotify.
//!
//! Each file is a source that holds exactly the objects it lists: editing a file replaces them,
//! removing it deletes them. A file that is not YAML, or an object in it that does not parse,
//! is reported ([`Change::Errors`]) and never replaces what that file held before: the object's
//! last good version stays in force, the file's other objects are updated. Only changed files
//! are read again, so a directory of thousands of objects costs one file per edit.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    model::Change,
    resource::{self, Key, Object, Origin},
    yaml,
};

/// Files written in several steps are read once they have been quiet this long.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{dir}: {error}")]
    Dir { dir: String, error: std::io::Error },
    #[error("--config-dir {dir}: watching: {error}")]
    Watch { dir: String, error: notify::Error },
}

/// The objects each file holds now.
#[derive(Debug, Default)]
pub struct Files {
    dir: PathBuf,
    held: BTreeMap<PathBuf, BTreeMap<Key, Object>>,
}

impl Files {
    pub fn new(dir: &Path) -> Files {
        Files { dir: dir.to_path_buf(), held: BTreeMap::new() }
    }

    /// Reads every file of the directory: the initial load.
    pub fn load_all(&mut self) -> Result<Vec<Change>, Error> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|error| Error::Dir { dir: self.dir.display().to_string(), error })?;
        let mut paths: BTreeSet<PathBuf> =
            entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_config_file(p)).collect();
        // Files that disappeared since the last full load.
        paths.extend(self.held.keys().cloned());
        Ok(self.reload(paths))
    }

    /// Reads the given files again (created, changed or removed).
    pub fn reload(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Vec<Change> {
        let mut changes = Vec::new();
        for path in paths {
            if !is_config_file(&path) {
                continue;
            }
            let source = path.display().to_string();
            let old = self.held.remove(&path).unwrap_or_default();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    changes.extend(old.into_keys().map(Change::Delete));
                    changes.push(Change::Errors { source, errors: Vec::new() });
                    continue;
                }
                Err(e) => {
                    changes.push(Change::Errors {
                        source: source.clone(),
                        errors: vec![file_error(&source, 0, e.to_string())],
                    });
                    self.held.insert(path, old);
                    continue;
                }
            };
            let docs = match yaml::documents(&source, &text) {
                Ok(d) => d,
                Err(e) => {
                    changes.push(Change::Errors {
                        source: source.clone(),
                        errors: vec![file_error(&source, e.line, e.reason)],
                    });
                    self.held.insert(path, old);
                    continue;
                }
            };
            let mut now: BTreeMap<Key, Object> = BTreeMap::new();
            let mut errors = Vec::new();
            for doc in docs {
                let origin = Arc::new(Origin {
                    source: source.clone(),
                    lines: Some(Arc::new(doc.lines)),
                    prefix: String::new(),
                });
                for parsed in resource::parse(doc.value, &origin) {
                    match parsed {
                        Ok(obj) => {
                            now.insert(obj.meta.key.clone(), obj);
                        }
                        Err(e) => {
                            // The object's last good version stays in force.
                            if let Some((k, o)) = old.iter().find(|(k, _)| k.to_string() == e.resource) {
                                now.insert(k.clone(), o.clone());
                            }
                            errors.push(e);
                        }
                    }
                }
            }
            if text.trim().is_empty() && !old.is_empty() {
                // An empty file is what an editor or `>` leaves mid-write: never a reason to drop
                // good objects. Removing the file deletes them.
                errors.push(file_error(
                    &source,
                    0,
                    "the file is empty; its previous objects stay until it is removed".into(),
                ));
                now = old.clone();
            }
            changes.extend(old.keys().filter(|k| !now.contains_key(*k)).cloned().map(Change::Delete));
            changes.extend(now.values().cloned().map(Change::Upsert));
            changes.push(Change::Errors { source, errors });
            self.held.insert(path, now);
        }
        changes
    }
}

/// Reads files and directories once (`mesh-pilot analyze -f`): what a watched directory would hold.
pub fn read(paths: &[PathBuf]) -> Result<Vec<Change>, Error> {
    let mut changes = Vec::new();
    for p in paths {
        if p.is_dir() {
            changes.extend(Files::new(p).load_all()?);
        } else {
            let mut files = Files::new(p.parent().unwrap_or(Path::new(".")));
            if !p.exists() {
                let error = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory");
                return Err(Error::Dir { dir: p.display().to_string(), error });
            }
            changes.extend(files.reload([p.clone()]));
        }
    }
    Ok(changes)
}

fn file_error(source: &str, line: usize, reason: String) -> resource::ParseError {
    resource::ParseError {
        file: source.to_string(),
        line: (line > 0).then_some(line),
        resource: "file".into(),
        field: String::new(),
        reason,
    }
}

/// YAML or JSON, and not an editor's temporary or backup file.
fn is_config_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !name.starts_with('.') && [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext))
}

/// Loads the directory, then sends the changes of every later edit, until `tx` closes. Returns
/// once the first load is sent, with the watcher running in the background task.
pub async fn watch(dir: PathBuf, tx: mpsc::Sender<Vec<Change>>) -> Result<tokio::task::JoinHandle<()>, Error> {
    use notify::{RecursiveMode, Watcher};
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !matches!(event.kind, notify::EventKind::Access(_)) {
                for p in event.paths {
                    let _ = ev_tx.send(p);
                }
            }
        }
    })
    .map_err(|error| Error::Watch { dir: dir.display().to_string(), error })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|error| Error::Watch { dir: dir.display().to_string(), error })?;
    let mut files = Files::new(&dir);
    let first = files.load_all()?;
    let _ = tx.send(first).await;
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        while let Some(p) = ev_rx.recv().await {
            let mut paths = BTreeSet::from([p]);
            loop {
                match tokio::time::timeout(DEBOUNCE, ev_rx.recv()).await {
                    Ok(Some(p)) => {
                        paths.insert(p);
                    }
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let changes = files.reload(paths);
            if !changes.is_empty() && tx.send(changes).await.is_err() {
                return;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(o) => format!("+{}", o.meta.key),
                Change::Delete(k) => format!("-{k}"),
                Change::Errors { errors, .. } => format!("errors {}", errors.len()),
            })
            .collect()
    }

    #[test]
    fn a_file_holds_exactly_its_objects_and_a_bad_object_keeps_its_last_good_version() {
        let tmp = mesh_lab::TempDir::new("pilot");
        let dir = tmp.path().to_path_buf();
        let f = dir.join("rules.yaml");
        let vs = |name: &str, host: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec: {{hosts: {host}}}\n---\n")
        };
        std::fs::write(&f, vs("a", "[a]") + &vs("b", "[b]")).unwrap();
        std::fs::write(dir.join(".rules.yaml.swp"), "garbage").unwrap();
        let mut files = Files::new(&dir);
        let c = files.load_all().unwrap();
        assert_eq!(keys(&c), ["+VirtualService default/a", "+VirtualService default/b", "errors 0"]);

        // b becomes invalid: its old version stays; a is removed.
        std::fs::write(&f, vs("b", "b")).unwrap();
        let c = files.reload([f.clone()]);
        assert_eq!(keys(&c), ["-VirtualService default/a", "+VirtualService default/b", "errors 1"]);
        let Change::Errors { errors, .. } = &c[2] else { panic!() };
        assert_eq!((errors[0].field.as_str(), errors[0].line), ("spec.hosts", Some(4)));

        // Emptied mid-write: nothing is dropped. Removed: everything is.
        std::fs::write(&f, "").unwrap();
        assert_eq!(keys(&files.reload([f.clone()])), ["+VirtualService default/b", "errors 1"]);
        std::fs::remove_file(&f).unwrap();
        assert_eq!(keys(&files.reload([f.clone()])), ["-VirtualService default/b", "errors 0"]);
    }
}
