//! Per-test loopback address blocks.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// A 127.a.b.0/24 block of its own for one test. `a` is derived from the process id and `b`
/// from a per-process counter; the block is then claimed by binding `CLAIM_HOST:CLAIM_PORT` in
/// it, held until the process exits, so two test processes whose ids derive the same `a` (one
/// in 200) move on to another block instead of sharing one (knotd on `.53` of both refused
/// "address already in use" when they did).
///
/// Conventional hosts: `.1` gateway, `.2` sink, `.3` a second sink, `.20`–`.29` SMTP clients,
/// `.30`–`.39` Postfix, `.254` the claim.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    a: u8,
    b: u8,
}

const CLAIM_HOST: u8 = 254;
/// Outside the kernel's ephemeral range (32768–60999), so no client socket takes it by chance.
const CLAIM_PORT: u16 = 65000;

static CLAIMS: Mutex<Vec<TcpListener>> = Mutex::new(Vec::new());

impl Net {
    pub fn new() -> Net {
        loop {
            let n = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
            let pid = std::process::id();
            // 127.0.x.x holds 127.0.0.1, which other software may use; start at 127.16.
            let a = 16 + ((pid + n / 250) % 200) as u8;
            let b = 1 + (n % 250) as u8;
            let net = Net { a, b };
            match TcpListener::bind((net.ip(CLAIM_HOST), CLAIM_PORT)) {
                Ok(claim) => {
                    CLAIMS.lock().unwrap_or_else(|e| e.into_inner()).push(claim);
                    return net;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && n < 50_000 => continue,
                Err(e) => panic!(
                    "claim the address block {} on port {CLAIM_PORT}: {e} (every block was \
                     taken: does something listen on *:{CLAIM_PORT}?)",
                    net.cidr()
                ),
            }
        }
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

/// A port nothing listens on right now, on an address of this test's own block, and never one
/// handed out before in this process: the kernel may give the same ephemeral port to two
/// successive `bind(0)`s once the first is closed, and a gateway started with that port for
/// both its SMTP and admin listeners failed "address already in use".
pub fn free_port(ip: Ipv4Addr) -> u16 {
    static GIVEN: Mutex<Vec<(Ipv4Addr, u16)>> = Mutex::new(Vec::new());
    // A panic elsewhere while holding it must not hide the real cause behind a poisoned lock.
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Hold every candidate until one is new, so the kernel cannot offer the same one again.
    let mut held = Vec::new();
    loop {
        let l = TcpListener::bind((ip, 0)).expect("bind an ephemeral port on loopback");
        let port = l.local_addr().expect("local addr").port();
        if !given.contains(&(ip, port)) {
            given.push((ip, port));
            return port;
        }
        held.push(l);
    }
}

/// An address where connections are refused (a "down" next hop).
pub fn closed_addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, free_port(ip)))
}
