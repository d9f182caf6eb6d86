//! Per-test loopback address blocks.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// A 127.a.b.0/24 block of its own for one test. `a` is derived from the process id and `b`
/// from a per-process counter, so parallel tests (and parallel test processes) don't collide.
///
/// Conventional hosts: `.1` gateway, `.2` sink, `.3` a second sink, `.20`–`.29` SMTP clients,
/// `.30`–`.39` Postfix.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    a: u8,
    b: u8,
}

impl Net {
    pub fn new() -> Net {
        let n = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // 127.0.x.x holds 127.0.0.1, which other software may use; start at 127.16.
        let a = 16 + ((pid + n / 250) % 200) as u8;
        let b = 1 + (n % 250) as u8;
        Net { a, b }
    }

    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.a, self.b, host)
    }

    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.ip(1)
    }

    pub fn sink_ip(&self) -> Ipv4Addr {
        self.ip(2)
    }

    /// A simulated SMTP client address (`n` in 0..10).
    pub fn client(&self, n: u8) -> Ipv4Addr {
        self.ip(20 + n)
    }

    /// The address block as CIDR, e.g. for `internalSenders`.
    pub fn cidr(&self) -> String {
        format!("127.{}.{}.0/24", self.a, self.b)
    }
}

/// A port nothing listens on right now, on an address of this test's own block.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("bind an ephemeral port on loopback");
    l.local_addr().expect("local addr").port()
}

/// An address where connections are refused (a "down" next hop).
pub fn closed_addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, free_port(ip)))
}
