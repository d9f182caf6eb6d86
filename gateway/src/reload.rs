//! Hot reload by polling. Polling (not inotify) because the kubelet replaces a mounted volume by
//! swapping the `..data` symlink, which inotify on the file path does not see, while plain
//! rewrites outside Kubernetes change only mtime/contents; a fingerprint of canonical paths,
//! mtimes, sizes and the two config files' bytes catches both.

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

pub async fn watch(paths: ConfigPaths, state: Arc<State>, every: Duration) {
    let p = paths.clone();
    let mut last = tokio::task::spawn_blocking(move || fingerprint(&p))
        .await
        .unwrap_or_default();
    loop {
        tokio::time::sleep(every).await;
        let p = paths.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&p)).await else {
            continue;
        };
        if now == last {
            continue;
        }
        last = now;
        let p = paths.clone();
        if let Ok(result) = tokio::task::spawn_blocking(move || load(&p)).await {
            apply(&state, result);
        }
    }
}
