//! Pod network of the process kubelet: pod IPs as /32 addresses on `lo`, and per-pod DNS.
//!
//! Pod IPs come from `--pod-cidr`, a range inside the guarded pod CIDR 10.244.0.0/16 (or, for
//! runs without root, inside 127.0.0.0/8, where every address is already local and nothing is
//! added). For 10.244/16 the kubelet adds `<ip>/32` to `lo` when it hands out an IP and removes
//! it when the IP is released; at start and at shutdown it removes every address of its range
//! from `lo` (a crashed kubelet's leftovers). Invariant (tests/cluster/README.md): no packet to
//! the pod range may leave the machine, so the kubelet refuses to add an address unless an
//! `unreachable` route covers its range (tests/cluster/up.sh installs it first): an address
//! that is not assigned then fails locally instead of following the default route.
//!
//! DNS: with `--cluster-dns`, a ClusterFirst pod's process runs in its own mount namespace in
//! which `<pod dir>/resolv.conf` is bind-mounted over `/etc/resolv.conf` (see [`ResolvMount`]);
//! the host's file and every other mount stay as they are.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod;

/// The pod CIDR of the test clusters; every address handed out by a kubelet lies inside it.
pub const POD_SUPERNET: &str = "10.244.0.0/16";

/// Whether the kubelet must put pod IPs on `lo` (10.244/16) or not (127/8). Errors for any
/// other range: an address outside both could be routed off the machine.
pub fn manages_addresses(cidr: Ipv4Net) -> anyhow::Result<bool> {
    let pods: Ipv4Net = POD_SUPERNET.parse().context("parse pod supernet")?;
    let loopback: Ipv4Net = "127.0.0.0/8".parse().context("parse 127.0.0.0/8")?;
    if pods.contains(&cidr) {
        Ok(true)
    } else if loopback.contains(&cidr) {
        Ok(false)
    } else {
        bail!("--pod-cidr {cidr} is neither inside {POD_SUPERNET} nor inside 127.0.0.0/8")
    }
}

async fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An `unreachable` route in the main table covers `cidr` (the no-packet-leaves guard).
pub async fn guard_present(cidr: Ipv4Net) -> anyhow::Result<bool> {
    let routes = ip(&[
        "-4",
        "route",
        "show",
        "table",
        "main",
        "type",
        "unreachable",
    ])
    .await?;
    Ok(routes.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<Ipv4Net>().ok())
            .is_some_and(|net| net.contains(&cidr))
    }))
}

/// Adds `ip/32` to `lo` (idempotent: a kubelet restart re-adds the IP a pod keeps).
pub async fn add_address(addr: Ipv4Addr) -> anyhow::Result<()> {
    ip(&["addr", "replace", &format!("{addr}/32"), "dev", "lo"]).await?;
    Ok(())
}

/// Removes `ip/32` from `lo`; an address that is already gone is fine.
pub async fn del_address(addr: Ipv4Addr) -> anyhow::Result<()> {
    match ip(&["addr", "del", &format!("{addr}/32"), "dev", "lo"]).await {
        Ok(_) => Ok(()),
        Err(e) if format!("{e}").contains("Cannot assign requested address") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes every address of `cidr` from `lo`; returns how many there were.
pub async fn flush_range(cidr: Ipv4Net) -> anyhow::Result<usize> {
    let out = ip(&["-4", "-o", "addr", "show", "dev", "lo"]).await?;
    let mut n = 0;
    for addr in out.lines().filter_map(|l| {
        let mut it = l.split_whitespace().skip_while(|w| *w != "inet");
        it.nth(1)?.split('/').next()?.parse::<Ipv4Addr>().ok()
    }) {
        if cidr.contains(&addr) {
            del_address(addr).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// The resolv.conf of a ClusterFirst pod, as a real kubelet writes it, or `None` when the pod
/// uses the host's resolver (dnsPolicy Default, or hostNetwork without ClusterFirstWithHostNet).
pub fn resolv_conf(pod: &Pod, cluster_dns: Option<Ipv4Addr>, domain: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let host_net = spec.host_network.unwrap_or(false);
    let cfg = spec.dns_config.as_ref();
    let (mut servers, mut search, mut options) = match (policy, host_net) {
        ("None", _) => (vec![], vec![], vec![]),
        ("ClusterFirst", false) | ("ClusterFirstWithHostNet", _) => (
            vec![cluster_dns?.to_string()],
            vec![
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_string(),
            ],
            vec!["ndots:5".to_string()],
        ),
        _ => return None,
    };
    if let Some(c) = cfg {
        servers.extend(c.nameservers.iter().flatten().cloned());
        search.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let Some(name) = o.name.as_deref() else {
                continue;
            };
            options.retain(|x| x.split(':').next() != Some(name));
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            });
        }
    }
    if servers.is_empty() {
        return None;
    }
    let mut out = String::new();
    for s in servers.iter().take(3) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    Some(out)
}

/// What the child does between fork and exec to see its own `/etc/resolv.conf`: a new mount
/// namespace, `/` made recursively slave (nothing it mounts propagates back to the host, host
/// mounts still reach it), then the pod's file bind-mounted over `/etc/resolv.conf`. The paths
/// are C strings prepared before the fork, so the child only makes raw syscalls.
pub struct ResolvMount {
    source: CString,
    target: CString,
    root: CString,
}

impl ResolvMount {
    pub fn new(source: &Path) -> anyhow::Result<Self> {
        use std::os::unix::ffi::OsStrExt as _;
        Ok(Self {
            source: CString::new(source.as_os_str().as_bytes()).context("resolv.conf path")?,
            target: CString::new("/etc/resolv.conf").context("target path")?,
            root: CString::new("/").context("root path")?,
        })
    }

    /// Runs in the forked child: only async-signal-safe syscalls, no allocation.
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls on NUL-terminated strings that outlive the call.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                self.source.as_ptr(),
                self.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": ns},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn pod_ranges() {
        assert!(manages_addresses("10.244.3.0/24".parse().unwrap()).unwrap());
        assert!(!manages_addresses("127.0.10.0/24".parse().unwrap()).unwrap());
        assert!(manages_addresses("10.245.0.0/24".parse().unwrap()).is_err());
        assert!(manages_addresses("10.0.0.0/8".parse().unwrap()).is_err());
    }

    #[test]
    fn cluster_first_resolv_conf() {
        let dns = Some(Ipv4Addr::new(10, 96, 0, 10));
        let p = pod("partnergate", serde_json::json!({"containers": []}));
        assert_eq!(
            resolv_conf(&p, dns, "cluster.local").unwrap(),
            "nameserver 10.96.0.10\n\
             search partnergate.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5\n"
        );
        // no cluster DNS configured, dnsPolicy Default, hostNetwork: the host's resolver
        assert_eq!(resolv_conf(&p, None, "cluster.local"), None);
        let d = pod(
            "x",
            serde_json::json!({"containers": [], "dnsPolicy": "Default"}),
        );
        assert_eq!(resolv_conf(&d, dns, "cluster.local"), None);
        let h = pod(
            "x",
            serde_json::json!({"containers": [], "hostNetwork": true}),
        );
        assert_eq!(resolv_conf(&h, dns, "cluster.local"), None);
        // dnsConfig is merged; an option given there replaces the default one
        let c = pod(
            "x",
            serde_json::json!({"containers": [], "dnsConfig": {
                "searches": ["example.test"], "options": [{"name": "ndots", "value": "2"}]}}),
        );
        assert_eq!(
            resolv_conf(&c, dns, "cluster.local").unwrap(),
            "nameserver 10.96.0.10\n\
             search x.svc.cluster.local svc.cluster.local cluster.local example.test\n\
             options ndots:2\n"
        );
    }
}
