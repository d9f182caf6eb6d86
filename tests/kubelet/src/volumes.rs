//! Volume materialisation with the kubelet's atomic-writer layout:
//!
//! ```text
//! <vol>/..2026_07_22_10_00_00.123456789/<files>   payload of one version
//! <vol>/..data -> ..2026_07_22_10_00_00.123456789 switched by an atomic rename
//! <vol>/<top-level entry> -> ..data/<top-level entry>
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::KeyToPath;

/// Relative path -> (content, mode).
pub type Payload = BTreeMap<String, (Vec<u8>, u32)>;

const DATA_DIR: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

fn valid_rel_path(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !p.starts_with("..")
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Projects `source` (key -> bytes) into `out` following `items` (or every key when `items` is
/// absent). Missing keys named in `items` are an error unless `optional`.
pub fn project_keys(
    out: &mut Payload,
    source: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
    optional: bool,
    what: &str,
) -> anyhow::Result<()> {
    match items {
        None => {
            for (k, v) in source {
                if valid_rel_path(k) {
                    out.insert(k.clone(), (v.clone(), mode));
                }
            }
        }
        Some(items) => {
            for it in items {
                if !valid_rel_path(&it.path) {
                    bail!("{what}: invalid item path {:?}", it.path);
                }
                match source.get(&it.key) {
                    Some(v) => {
                        let m = it.mode.map(|m| (m as u32) & 0o777).unwrap_or(mode);
                        out.insert(it.path.clone(), (v.clone(), m));
                    }
                    None if optional => {}
                    None => bail!("{what}: key {:?} not found", it.key),
                }
            }
        }
    }
    Ok(())
}

fn timestamp_dir_name() -> String {
    let now = jiff::Timestamp::now();
    format!("..{}", now.strftime("%Y_%m_%d_%H_%M_%S.%9f"))
}

fn top_level(p: &str) -> &str {
    p.split('/').next().unwrap_or(p)
}

/// Writes `payload` into `dir` atomically (new timestamped directory, `..data` symlink swapped
/// by rename, top-level symlinks added/removed), then removes the previous version.
pub fn write_atomic(dir: &Path, payload: &Payload) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let old_target = std::fs::read_link(dir.join(DATA_DIR)).ok();

    // 1. new version directory
    let mut ts_name = timestamp_dir_name();
    let mut n = 0;
    while dir.join(&ts_name).exists() {
        n += 1;
        ts_name = format!("{}{n}", timestamp_dir_name());
    }
    let ts_dir = dir.join(&ts_name);
    std::fs::create_dir(&ts_dir).with_context(|| format!("create {}", ts_dir.display()))?;
    std::fs::set_permissions(&ts_dir, std::fs::Permissions::from_mode(0o755))?;
    for (rel, (content, mode)) in payload {
        let file = ts_dir.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content).with_context(|| format!("write {}", file.display()))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
    }

    // 2. ..data_tmp -> new version, renamed over ..data
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts_name, &tmp)
        .with_context(|| format!("symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(DATA_DIR)).context("swap ..data")?;

    // 3. top-level symlinks
    let wanted: BTreeSet<&str> = payload.keys().map(|k| top_level(k)).collect();
    for name in &wanted {
        let link = dir.join(name);
        let target = Path::new(DATA_DIR).join(name);
        match std::fs::read_link(&link) {
            Ok(t) if t == target => {}
            _ => {
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&target, &link)
                    .with_context(|| format!("symlink {}", link.display()))?;
            }
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") || wanted.contains(name.as_str()) {
            continue;
        }
        if entry.file_type()?.is_symlink() {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    // 4. previous version(s)
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..")
            && name != DATA_DIR
            && name != ts_name
            && entry.file_type()?.is_dir()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let _ = old_target;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pg-kubelet-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn atomic_layout_and_update() -> anyhow::Result<()> {
        let d = tmpdir("atomic");
        let mut p = Payload::new();
        p.insert("a.txt".into(), (b"one".to_vec(), 0o644));
        p.insert("sub/b.txt".into(), (b"two".to_vec(), 0o600));
        write_atomic(&d, &p)?;
        assert_eq!(std::fs::read(d.join("a.txt"))?, b"one");
        assert_eq!(std::fs::read(d.join("sub/b.txt"))?, b"two");
        assert_eq!(
            std::fs::read_link(d.join("a.txt"))?,
            Path::new("..data/a.txt")
        );
        let first = std::fs::read_link(d.join("..data"))?;
        assert!(first.to_string_lossy().starts_with("..20"));

        let mut p2 = Payload::new();
        p2.insert("a.txt".into(), (b"uno".to_vec(), 0o644));
        write_atomic(&d, &p2)?;
        assert_eq!(std::fs::read(d.join("a.txt"))?, b"uno");
        assert!(!d.join("sub").exists());
        assert!(!d.join(&first).exists());
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }
}
