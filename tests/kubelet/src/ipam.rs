//! Pod IP allocation inside the configured pod range (`--pod-cidr`, see net.rs).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub struct Ipam {
    cidr: Ipv4Net,
    used: HashSet<Ipv4Addr>,
}

impl Ipam {
    pub fn new(cidr: Ipv4Net) -> Self {
        Self {
            cidr: cidr.trunc(),
            used: HashSet::new(),
        }
    }

    /// Allocates `preferred` when it is free and in range (a pod keeps its IP across kubelet
    /// restarts), otherwise the lowest free address. The first host address (`.1` of a /24) is
    /// never handed out, like a bridge gateway.
    pub fn allocate(&mut self, preferred: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = self.cidr.hosts().next();
        if let Some(p) = preferred
            && self.cidr.contains(&p)
            && Some(p) != first
            && p != self.cidr.network()
            && p != self.cidr.broadcast()
            && !self.used.contains(&p)
        {
            self.used.insert(p);
            return Some(p);
        }
        let ip = self
            .cidr
            .hosts()
            .skip(1)
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        Some(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_loopback_ips() {
        let mut ipam = Ipam::new("127.0.10.0/29".parse().unwrap_or_else(|_| unreachable!()));
        let a = ipam.allocate(None);
        let b = ipam.allocate(None);
        assert_eq!(a, Some(Ipv4Addr::new(127, 0, 10, 2)));
        assert_eq!(b, Some(Ipv4Addr::new(127, 0, 10, 3)));
        assert_eq!(
            ipam.allocate(Some(Ipv4Addr::new(127, 0, 10, 6))),
            Some(Ipv4Addr::new(127, 0, 10, 6))
        );
        // taken: falls back to the lowest free one
        assert_eq!(
            ipam.allocate(Some(Ipv4Addr::new(127, 0, 10, 6))),
            Some(Ipv4Addr::new(127, 0, 10, 4))
        );
        // out of range preferred address is ignored
        assert_eq!(
            ipam.allocate(Some(Ipv4Addr::new(10, 0, 0, 1))),
            Some(Ipv4Addr::new(127, 0, 10, 5))
        );
        assert_eq!(ipam.allocate(None), None);
        ipam.release(Ipv4Addr::new(127, 0, 10, 3));
        assert_eq!(ipam.allocate(None), Some(Ipv4Addr::new(127, 0, 10, 3)));
    }
}
