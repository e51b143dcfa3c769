//! The config file as a source of updates: inotify on its directory, debounced, and SIGHUP.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use crate::control::Control;

/// Turns file-system events on the config file into reload requests (debounced by the caller).
/// The parent directory is watched, so editors that replace the file by renaming are seen too.
pub fn watch_file(path: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let name = path.file_name().map(|n| n.to_os_string());
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let ours = event.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name);
            let relevant = !matches!(event.kind, notify::EventKind::Access(_));
            if ours && relevant {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Reloads on file events (after `debounce` of quiet, so a file written in several steps is read
/// once complete) and on SIGHUP, until the channel closes.
pub async fn reload_loop(control: Arc<Control>, mut events: mpsc::UnboundedReceiver<()>, debounce: Duration) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    loop {
        tokio::select! {
            ev = events.recv() => {
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
            }
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the config file");
            }
        }
        control.reload_file();
    }
}
