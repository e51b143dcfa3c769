//! The config file as a source of updates: inotify, debounced, and SIGHUP.
//!
//! What is watched is every path whose replacement changes what reading the config path gives
//! ([`chain`]): the path itself, each symbolic link followed on the way, and the file finally
//! read. A Kubernetes ConfigMap volume is the case in point: `proxy.yaml` is a link to
//! `..data/proxy.yaml`, `..data` a link to a timestamped directory, and the kubelet updates it by
//! renaming a new `..data` over the old one — no event ever names `proxy.yaml` (Envoy has
//! `watched_directory` for this, Istio's agent watches the link's target). Editors that write a
//! sibling and rename it over the file are the same event, one level down.
//!
//! What counts as a change: a name created, removed or renamed, and a file closed after writing
//! (`IN_CLOSE_WRITE`). Plain writes (`IN_MODIFY`) are not: a file written in place is complete
//! only when its writer closes it, and one read in between is half a config (a writer pausing
//! after `endpoints:` had a third of the requests answered 503). Whatever the event, the file is
//! then read and applied only if its content differs from the last read, so events on the
//! directory's other files cost a comparison at most.

use std::{
    collections::HashSet,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{
    event::{AccessKind, AccessMode, ModifyKind},
    EventKind, RecursiveMode, Watcher,
};
use tokio::sync::mpsc;

use crate::control::{Control, Trigger};

/// Symbolic links followed at most (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// The paths whose replacement changes what reading `path` gives: `path`, every symbolic link
/// met while resolving it (the file itself or a directory on the way, like the kubelet's
/// `..data`), and the file finally read. Lexical, from the file system as it is now.
pub fn chain(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let mut current = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    'resolve: for _ in 0..MAX_LINKS {
        let mut prefix = PathBuf::new();
        let components: Vec<Component> = current.components().collect();
        for (i, c) in components.iter().enumerate() {
            prefix.push(c);
            let is_link = std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink());
            if !is_link {
                continue;
            }
            let Ok(target) = std::fs::read_link(&prefix) else { break 'resolve };
            if !out.contains(&prefix) {
                out.push(prefix.clone());
            }
            let base = prefix.parent().map(Path::to_path_buf).unwrap_or_default();
            let mut next = normalize(&base.join(target));
            for rest in &components[i + 1..] {
                next.push(rest);
            }
            current = next;
            continue 'resolve;
        }
        break;
    }
    if !out.contains(&current) {
        out.push(current);
    }
    out
}

/// `a/b/../c` → `a/c`, without touching the file system (a link's target is joined lexically).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The watch on the config file's [`chain`]: the directories holding its paths, re-aimed after
/// every reload (a ConfigMap update points `..data` at a new directory).
struct FileWatch {
    watcher: notify::RecommendedWatcher,
    path: PathBuf,
    /// The chain as last resolved; the watcher's callback reads it.
    relevant: Arc<Mutex<HashSet<PathBuf>>>,
    dirs: HashSet<PathBuf>,
}

impl FileWatch {
    fn new(path: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<FileWatch> {
        let relevant: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let seen = relevant.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else {
                // The watch itself failed (inotify queue overflow and the like): look anyway.
                let _ = tx.send(());
                return;
            };
            let changes = matches!(
                event.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(_))
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Any
                    | EventKind::Other
            );
            if !changes {
                return;
            }
            let relevant = seen.lock().expect("watch set lock poisoned");
            if event.need_rescan() || event.paths.iter().any(|p| relevant.contains(p)) {
                let _ = tx.send(());
            }
        })?;
        let mut watch = FileWatch { watcher, path: path.to_path_buf(), relevant, dirs: HashSet::new() };
        watch.aim()?;
        Ok(watch)
    }

    /// Resolves the chain again and watches the directories of its paths.
    fn aim(&mut self) -> notify::Result<()> {
        let chain = chain(&self.path);
        let absolute: HashSet<PathBuf> =
            chain.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())).collect();
        let dirs: HashSet<PathBuf> =
            absolute.iter().filter_map(|p| p.parent().map(Path::to_path_buf)).filter(|d| d.is_dir()).collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            self.watcher.watch(new, RecursiveMode::NonRecursive)?;
        }
        self.dirs = dirs;
        *self.relevant.lock().expect("watch set lock poisoned") = absolute;
        Ok(())
    }
}

/// Reloads on changes of the file's chain (after `debounce` of quiet) and on SIGHUP (always),
/// for as long as the process runs.
pub async fn reload_loop(control: Arc<Control>, path: PathBuf, debounce: Duration) {
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut watch = match FileWatch::new(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    loop {
        let trigger = tokio::select! {
            ev = events.recv(), if watch.is_some() => {
                if ev.is_none() { return; }
                // Let a burst of events settle.
                loop {
                    match tokio::time::timeout(debounce, events.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                tracing::debug!("config file changed");
                Trigger::FileChanged
            }
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the config file");
                Trigger::Sighup
            }
        };
        control.reload_file(trigger).await;
        if let Some(w) = watch.as_mut() {
            if let Err(e) = w.aim() {
                tracing::warn!(error = %e, "re-watching the config file's directories");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn the_chain_of_a_configmap_volume_names_the_links_and_the_file() {
        let dir = mesh_lab::TempDir::new("chain");
        let d = dir.path();
        std::fs::create_dir(d.join("..2024_01")).unwrap();
        std::fs::write(d.join("..2024_01/proxy.yaml"), "{}").unwrap();
        symlink("..2024_01", d.join("..data")).unwrap();
        symlink("..data/proxy.yaml", d.join("proxy.yaml")).unwrap();
        let chain = chain(&d.join("proxy.yaml"));
        assert_eq!(chain, [d.join("proxy.yaml"), d.join("..data"), d.join("..2024_01/proxy.yaml")]);

        // A plain file is its own chain.
        std::fs::write(d.join("plain.yaml"), "{}").unwrap();
        assert_eq!(super::chain(&d.join("plain.yaml")), [d.join("plain.yaml")]);
    }
}
