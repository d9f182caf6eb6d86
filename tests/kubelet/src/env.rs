//! Container environment and command line: `valueFrom` resolution, `$(VAR)` expansion and the
//! rewriting of container mount paths to the directories the kubelet materialised.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client};

/// (mount path in the container, directory on this machine), longest mount path first.
pub type MountMap = Vec<(String, String)>;

fn is_path_char(c: char) -> bool {
    c.is_alphanumeric() || c == '.' || c == '-' || c == '_'
}

/// Replaces every occurrence of a container mount path (as a whole path prefix: not preceded or
/// followed by a path-name character) with the host directory it is materialised at.
pub fn rewrite_paths(s: &str, mounts: &MountMap) -> String {
    if mounts.is_empty() || !mounts.iter().any(|(from, _)| s.contains(from.as_str())) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'outer: while i < s.len() {
        let rest = &s[i..];
        for (from, to) in mounts {
            if rest.starts_with(from.as_str()) {
                let end = i + from.len();
                let next_ok = s[end..].chars().next().is_none_or(|c| !is_path_char(c));
                let prev_ok = s[..i]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !is_path_char(c) && c != '/');
                if next_ok && prev_ok {
                    out.push_str(to);
                    i = end;
                    continue 'outer;
                }
            }
        }
        if let Some(c) = rest.chars().next() {
            out.push(c);
            i += c.len_utf8();
        } else {
            break;
        }
    }
    out
}

/// Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` escapes a `$`, undefined
/// references are left as they are.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some((_, '$')) => {
                out.push('$');
                chars.next();
            }
            Some((_, '(')) => {
                if let Some(close) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + close];
                    if let Some(v) = vars.get(name) {
                        out.push_str(v);
                        // skip "(name)"
                        let end = i + 2 + close;
                        while let Some((j, _)) = chars.peek() {
                            if *j > end {
                                break;
                            }
                            chars.next();
                        }
                    } else {
                        out.push('$');
                    }
                } else {
                    out.push('$');
                }
            }
            _ => out.push('$'),
        }
    }
    out
}

/// Value of a downward-API field path (`metadata.name`, `metadata.labels['x']`, `status.podIP`...).
pub fn field_value(pod: &Pod, pod_ip: &str, path: &str) -> anyhow::Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_key = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?.to_string();
        Some(map.and_then(|m| m.get(&key).cloned()).unwrap_or_default())
    };
    let fmt_map = |map: Option<&BTreeMap<String, String>>| -> String {
        map.map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}\n", serde_json::Value::String(v.clone())))
                .collect()
        })
        .unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => fmt_map(meta.labels.as_ref()),
        "metadata.annotations" => fmt_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_string(),
        p => {
            if let Some(v) = map_key("metadata.labels['", meta.labels.as_ref()) {
                v
            } else if let Some(v) = map_key("metadata.annotations['", meta.annotations.as_ref()) {
                v
            } else {
                bail!("unsupported fieldRef {p}")
            }
        }
    })
}

/// Reads one key of a ConfigMap (data or binaryData). `Ok(None)`: object or key missing.
pub async fn configmap_key(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
) -> anyhow::Result<Option<String>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let Some(cm) = api.get_opt(name).await.context("get configmap")? else {
        return Ok(None);
    };
    if let Some(v) = cm.data.as_ref().and_then(|d| d.get(key)) {
        return Ok(Some(v.clone()));
    }
    Ok(cm
        .binary_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned()))
}

/// Reads one key of a Secret. `Ok(None)`: object or key missing.
pub async fn secret_key(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
) -> anyhow::Result<Option<String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let Some(s) = api.get_opt(name).await.context("get secret")? else {
        return Ok(None);
    };
    Ok(s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned()))
}

/// Resolves `envFrom` and `env` of `container` in order on top of `base` (service variables
/// etc.), with `$(VAR)` expansion against the variables defined so far.
pub async fn resolve_env(
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
    base: BTreeMap<String, String>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut vars = base;
    for src in container.env_from.iter().flatten() {
        let prefix = src.prefix.clone().unwrap_or_default();
        if let Some(r) = &src.config_map_ref {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            match api.get_opt(&r.name).await.context("get configmap")? {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        vars.insert(format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => bail!("configmap \"{}\" not found (envFrom)", r.name),
            }
        }
        if let Some(r) = &src.secret_ref {
            let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
            match api.get_opt(&r.name).await.context("get secret")? {
                Some(s) => {
                    for (k, v) in s.data.iter().flatten() {
                        vars.insert(
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v.0).into_owned(),
                        );
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => bail!("secret \"{}\" not found (envFrom)", r.name),
            }
        }
    }
    for e in container.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_value(pod, pod_ip, &f.field_path)?
            } else if let Some(r) = &from.config_map_key_ref {
                match configmap_key(client, &ns, &r.name, &r.key).await? {
                    Some(v) => v,
                    None if r.optional.unwrap_or(false) => continue,
                    None => bail!(
                        "env {}: configmap \"{}\" key \"{}\" not found",
                        e.name,
                        r.name,
                        r.key
                    ),
                }
            } else if let Some(r) = &from.secret_key_ref {
                match secret_key(client, &ns, &r.name, &r.key).await? {
                    Some(v) => v,
                    None if r.optional.unwrap_or(false) => continue,
                    None => bail!(
                        "env {}: secret \"{}\" key \"{}\" not found",
                        e.name,
                        r.name,
                        r.key
                    ),
                }
            } else if from.resource_field_ref.is_some() {
                // Resource limits are not enforced for processes; report "0" like an unset limit
                // would not. Good enough for a test substrate.
                "0".to_string()
            } else {
                bail!("env {}: unsupported valueFrom", e.name)
            }
        } else {
            String::new()
        };
        vars.insert(e.name.clone(), value);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_whole_path_prefixes_only() {
        let mounts: MountMap = vec![
            ("/etc/partnergate/tls".into(), "/s/tls".into()),
            ("/etc/partnergate/fleet".into(), "/s/fleet".into()),
        ];
        assert_eq!(
            rewrite_paths("--fleet=/etc/partnergate/fleet/fleet.json", &mounts),
            "--fleet=/s/fleet/fleet.json"
        );
        assert_eq!(
            rewrite_paths(
                r#"{"certFile":"/etc/partnergate/tls/tls.crt","x":"/etc/partnergate/tlsx/a","y":"/a/etc/partnergate/tls"}"#,
                &mounts
            ),
            r#"{"certFile":"/s/tls/tls.crt","x":"/etc/partnergate/tlsx/a","y":"/a/etc/partnergate/tls"}"#
        );
        assert_eq!(rewrite_paths("/etc/partnergate/tls", &mounts), "/s/tls");
    }

    #[test]
    fn expands_vars() {
        let mut vars = BTreeMap::new();
        vars.insert("A".to_string(), "x".to_string());
        assert_eq!(expand("$(A)/$(B)/$$(A)/$", &vars), "x/$(B)/$(A)/$");
    }
}
