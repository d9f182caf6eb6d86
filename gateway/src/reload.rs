//! Hot reload. The judge of "changed" is a fingerprint of canonical paths, mtimes, sizes and the
//! two config files' bytes: it catches both the kubelet's atomic `..data` symlink swap (which a
//! watch on the file path itself never sees) and plain rewrites outside Kubernetes. Filesystem
//! events (inotify through the `notify` crate) on the *directories* holding the watched files only
//! wake the check early, so a change is live within milliseconds; the periodic check stays as the
//! fallback for filesystems without events, for files whose directory appears later, and for a
//! parent directory that is itself a symlink swapped to another target (inotify follows the
//! target it was given).
//!
//! Invariants: readiness implies the watches are registered ([`Watcher::start`] completes before
//! the listener starts); a check follows every registration, so a change made between taking a
//! fingerprint and registering the watches is never left to the periodic check alone.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::live_config::{ConfigPaths, load, watched_files};
use crate::server::State;

/// What the watched files looked like at one moment; a reload happens when it changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileMark>);

#[derive(Debug, PartialEq, Eq)]
struct FileMark {
    path: PathBuf,
    canonical: Option<PathBuf>,
    modified: Option<SystemTime>,
    len: Option<u64>,
    digest: Option<Vec<u8>>,
}

/// Taken *before* the initial load by the caller, so a change between that load and the start
/// of [`watch`] is still seen as a change.
pub fn fingerprint(paths: &ConfigPaths) -> Fingerprint {
    marks(&watched_files(paths))
}

/// The fingerprint of `files`, whose first two are the fleet and connectors files (their bytes
/// count too). The list comes from the config, so it is worked out again only after a change,
/// not on every check: a change to either config file shows in its bytes anyway.
fn marks(files: &[PathBuf]) -> Fingerprint {
    let marks = files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let meta = std::fs::metadata(path).ok();
            let digest = if i < 2 {
                std::fs::read(path)
                    .ok()
                    .map(|b| Sha256::digest(&b).to_vec())
            } else {
                None
            };
            FileMark {
                canonical: std::fs::canonicalize(path).ok(),
                modified: meta.as_ref().and_then(|m| m.modified().ok()),
                len: meta.map(|m| m.len()),
                digest,
                path: path.clone(),
            }
        })
        .collect();
    Fingerprint(marks)
}

/// Applies a load result: swap on success, keep the last good config and report on error.
pub fn apply(
    state: &State,
    result: Result<crate::live_config::LiveConfig, Vec<crate::config::FieldError>>,
) {
    match result {
        Ok(rt) => {
            state.metrics.set_certificates(&rt.certificates);
            state.metrics.set_limits(&rt.fleet.limits);
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

/// Quiet period after a filesystem event: the check runs once no event has arrived for this
/// long, so a writer's truncate + write + close (or a kubelet's symlink swap) is seen complete.
const SETTLE: Duration = Duration::from_millis(5);
/// ...but a writer that never pauses does not hold the check off for longer than this.
const SETTLE_MAX: Duration = Duration::from_millis(250);

/// What the watcher watches: the directories holding the watched files (deduplicated), and the
/// file names in them that matter.
#[derive(Debug, PartialEq, Eq)]
struct WatchSet {
    dirs: Vec<PathBuf>,
    names: HashSet<OsString>,
}

impl WatchSet {
    fn of(files: &[PathBuf]) -> WatchSet {
        WatchSet {
            dirs: watched_dirs(files),
            names: files
                .iter()
                .filter_map(|f| f.file_name().map(OsStr::to_os_string))
                .collect(),
        }
    }

    /// An event about a watched file, or about a `..`-prefixed entry (the kubelet swaps
    /// `..data` and its timestamped directories, never the file names themselves). Other files
    /// in the same directory (a log file, an editor's swap file) do not wake the check.
    fn concerns(&self, event: &notify::Event) -> bool {
        event.paths.is_empty()
            || event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    self.names.contains(n) || n.as_encoded_bytes().starts_with(b"..")
                })
            })
    }
}

fn watched_dirs(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = files
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

/// Watches `set.dirs`; every event that can change one of `set.names` sends a wake-up. Opens and
/// reads (`Access`) are ignored: the check itself reads the config files, and waking on that would
/// make the loop wake itself forever. `None` when the platform offers no events (the periodic
/// check then does all the work). Blocking (inotify setup): call from a blocking thread.
fn event_watcher(
    set: WatchSet,
    wake: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dirs = set.dirs.clone();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            let wakes = match &event {
                Ok(e) => !matches!(e.kind, notify::EventKind::Access(_)) && set.concerns(e),
                // An overflowed or broken event queue may have hidden a change.
                Err(_) => true,
            };
            if wakes {
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
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory for config changes; relying on the periodic check");
        }
    }
    Some(watcher)
}

/// The config watcher, its directory watches registered. [`Watcher::start`] returns only once
/// they are, and `main` starts the SMTP listener (which is what turns `/readyz` to 200) only after
/// that: a ready gateway is one whose config changes are being watched.
pub struct Watcher {
    paths: ConfigPaths,
    state: Arc<State>,
    every: Duration,
    last: Fingerprint,
    files: Arc<[PathBuf]>,
    watcher: Option<notify::RecommendedWatcher>,
    wake_tx: tokio::sync::mpsc::Sender<()>,
    wake_rx: tokio::sync::mpsc::Receiver<()>,
}

impl Watcher {
    /// Registers the directory watches. `last` is the fingerprint taken before the initial load;
    /// a change made after it but before the watches existed raised no event, so the first check
    /// runs at once instead of after `every`.
    pub async fn start(
        paths: ConfigPaths,
        state: Arc<State>,
        every: Duration,
        last: Fingerprint,
    ) -> Option<Watcher> {
        let (wake_tx, wake_rx) = tokio::sync::mpsc::channel::<()>(1);
        let (p, tx) = (paths.clone(), wake_tx.clone());
        let Ok((files, watcher)) = tokio::task::spawn_blocking(move || {
            let files: Arc<[PathBuf]> = watched_files(&p).into();
            let watcher = event_watcher(WatchSet::of(&files), tx);
            (files, watcher)
        })
        .await
        else {
            tracing::error!("config watcher could not start; config changes need a restart");
            return None;
        };
        let _ = wake_tx.try_send(());
        Some(Watcher {
            paths,
            state,
            every,
            last,
            files,
            watcher,
            wake_tx,
            wake_rx,
        })
    }

    /// Runs forever: on a filesystem event (after [`SETTLE`]) or every `every`, compares the
    /// fingerprint with the last one and, when it moved, loads and applies the config. The
    /// directory watches are set up again after every change, so a directory replaced by a rename
    /// is watched anew; the new watcher exists before the old one is dropped, and one more check
    /// follows its registration, so a change to a newly named directory made between the marks
    /// and the registration is not left to the periodic check.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                Some(()) = self.wake_rx.recv() => {
                    let give_up = tokio::time::Instant::now() + SETTLE_MAX;
                    while let Ok(Some(())) = tokio::time::timeout(SETTLE, self.wake_rx.recv()).await {
                        if tokio::time::Instant::now() >= give_up {
                            break;
                        }
                    }
                }
            }
            let f = self.files.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || marks(&f)).await else {
                continue;
            };
            if now == self.last {
                continue;
            }
            let (p, tx) = (self.paths.clone(), self.wake_tx.clone());
            let Ok((result, new_files, new_last, new_watcher)) =
                tokio::task::spawn_blocking(move || {
                    // The new config may name other material files (in other directories): mark
                    // and watch those. Marked before the load, so a change during it is seen next
                    // time.
                    let new_files: Arc<[PathBuf]> = watched_files(&p).into();
                    let new_last = marks(&new_files);
                    let result = load(&p);
                    let watcher = event_watcher(WatchSet::of(&new_files), tx);
                    (result, new_files, new_last, watcher)
                })
                .await
            else {
                continue;
            };
            apply(&self.state, result);
            (self.files, self.last) = (new_files, new_last);
            let old = std::mem::replace(&mut self.watcher, new_watcher);
            let _ = self.wake_tx.try_send(());
            // Dropping an inotify watcher joins its thread: not on an async worker.
            tokio::task::spawn_blocking(move || drop(old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(notify::EventKind::Modify(notify::event::ModifyKind::Any));
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn only_events_about_watched_files_or_kubelet_entries_wake_the_check() {
        let set = WatchSet {
            dirs: vec![PathBuf::from("/etc/pg")],
            names: ["connectors.json", "fleet.json"]
                .into_iter()
                .map(OsString::from)
                .collect(),
        };
        assert!(set.concerns(&event(&["/etc/pg/connectors.json"])));
        assert!(set.concerns(&event(&["/etc/pg/..data"])));
        assert!(set.concerns(&event(&["/etc/pg/..2026_11_28_14_00_00.1"])));
        assert!(set.concerns(&event(&["/etc/pg/x.tmp", "/etc/pg/fleet.json"])));
        assert!(
            set.concerns(&event(&[])),
            "an event without paths may be anything"
        );
        assert!(!set.concerns(&event(&["/etc/pg/gateway.log"])));
        assert!(!set.concerns(&event(&["/etc/pg/.connectors.json.swp"])));
    }
}
