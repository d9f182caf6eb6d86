//! Hot reload. The judge of "changed" is a fingerprint of canonical paths, mtimes, sizes and the
//! two config files' bytes: it catches both the kubelet's atomic `..data` symlink swap (which a
//! watch on the file path itself never sees) and plain rewrites outside Kubernetes. Filesystem
//! events (inotify through the `notify` crate) on the *directories* holding the watched files only
//! wake the check early, so a change is live within milliseconds; the periodic check stays as the
//! fallback for filesystems without events and for files whose directory appears later.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::runtime::{ConfigPaths, load, watched_files};
use crate::server::State;

#[derive(Debug, PartialEq, Eq)]
struct FileMark {
    path: PathBuf,
    canonical: Option<PathBuf>,
    modified: Option<SystemTime>,
    len: Option<u64>,
    digest: Option<Vec<u8>>,
}

fn fingerprint(paths: &ConfigPaths) -> Vec<FileMark> {
    watched_files(paths)
        .into_iter()
        .enumerate()
        .map(|(i, path)| {
            let meta = std::fs::metadata(&path).ok();
            let digest = if i < 2 {
                std::fs::read(&path)
                    .ok()
                    .map(|b| Sha256::digest(&b).to_vec())
            } else {
                None
            };
            FileMark {
                canonical: std::fs::canonicalize(&path).ok(),
                modified: meta.as_ref().and_then(|m| m.modified().ok()),
                len: meta.map(|m| m.len()),
                digest,
                path,
            }
        })
        .collect()
}

/// Applies a load result: swap on success, keep the last good config and report on error.
pub fn apply(
    state: &State,
    result: Result<crate::runtime::Runtime, Vec<crate::config::FieldError>>,
) {
    match result {
        Ok(rt) => {
            state.metrics.set_certificates(&rt.certificates);
            let old_listen = state.config.load().fleet.listen;
            if rt.fleet.listen != old_listen {
                tracing::warn!(listen = %rt.fleet.listen, "a new listen address takes effect only after a restart");
            }
            tracing::info!(config_hash = %rt.hash, inbound = rt.connectors.inbound.len(), outbound = rt.connectors.outbound.len(), "config reloaded");
            state.config.store(Arc::new(rt));
            if let Ok(mut e) = state.last_reload_error.lock() {
                *e = None;
            }
            state.metrics.reload("success");
        }
        Err(errors) => {
            let msg = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(error = %msg, "config reload failed; keeping the last good config");
            if let Ok(mut e) = state.last_reload_error.lock() {
                *e = Some(msg);
            }
            state.metrics.reload("failure");
        }
    }
}

/// Quiet time after a filesystem event before the check, so that a writer's truncate + write +
/// rename sequence is seen once, complete.
const SETTLE: Duration = Duration::from_millis(5);

/// The directories holding the watched files (deduplicated): events on them wake the check.
fn watched_dirs(paths: &ConfigPaths) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = watched_files(paths)
        .iter()
        .filter_map(|f| f.parent().map(std::path::Path::to_path_buf))
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Watches `dirs` for changes; each event sends a wake-up. `None` when the platform offers no
/// events (the periodic check then does all the work).
fn event_watcher(
    dirs: &[PathBuf],
    wake: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                // A full channel already holds a wake-up: nothing is lost by dropping this one.
                let _ = wake.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "no filesystem events; config changes are picked up by the periodic check only");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory for config changes; relying on the periodic check");
        }
    }
    Some(watcher)
}

pub async fn watch(paths: ConfigPaths, state: Arc<State>, every: Duration) {
    let p = paths.clone();
    let mut last = tokio::task::spawn_blocking(move || fingerprint(&p))
        .await
        .unwrap_or_default();
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
    let p = paths.clone();
    let mut dirs = tokio::task::spawn_blocking(move || watched_dirs(&p))
        .await
        .unwrap_or_default();
    let mut watcher = event_watcher(&dirs, wake_tx.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            Some(()) = wake_rx.recv() => {
                tokio::time::sleep(SETTLE).await;
                while wake_rx.try_recv().is_ok() {}
            }
        }
        let p = paths.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&p)).await else {
            continue;
        };
        if now == last {
            continue;
        }
        last = now;
        let p = paths.clone();
        // A new config may reference material in other directories: watch those too.
        let Ok((result, now_dirs)) =
            tokio::task::spawn_blocking(move || (load(&p), watched_dirs(&p))).await
        else {
            continue;
        };
        apply(&state, result);
        if now_dirs != dirs {
            drop(watcher.take());
            watcher = event_watcher(&now_dirs, wake_tx.clone());
            dirs = now_dirs;
        }
    }
}
