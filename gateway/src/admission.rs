//! Admission to the SMTP listener: which client gets a connection slot, and which session gives
//! its slot up when the listener is full, so a flood of idle connections from many addresses
//! cannot lock partners out with the default limits (issue 12, item 1).
//!
//! The decisions are pure functions ([`client_key`], [`decide`], [`pick_victim`],
//! [`PrioritySet`]) unit-tested without sockets; [`Admission`] applies them to one table under
//! one lock, and a [`Ticket`] is the session's handle on its slot.
//!
//! Invariants:
//! - Every rule sees canonical addresses: an IPv4-mapped IPv6 address is its IPv4 address.
//! - Per-client counts key IPv4 by address and IPv6 by prefix (`limits.ipv6PrefixLength`), so
//!   one /64 is one client, not 2^64.
//! - `reservedConnectionsPercent` of `maxConnections` is kept for priority clients (fleet
//!   `internalSenders.ipRanges` and every Inbound connector's `senderIPRanges`): other clients
//!   never hold more than the rest.
//! - Only sessions that have not reached MAIL FROM are shed, and a general client never sheds
//!   a priority session. The victim is chosen by fair share first: the oldest such session of
//!   the client holding the most slots, if it holds at least two more than the newcomer (a flood
//!   from a few dozen addresses cannot out-churn a newcomer, and reconnecting flood clients only
//!   shuffle slots among themselves); failing that, the oldest such session of anyone once it is
//!   `timeouts.shedAfterSecs` old. A shed session stops counting at once (the newcomer gets its
//!   slot), says `421 4.7.0` at its next wait for a command and is dropped by the listener if
//!   still there after [`SHED_GRACE`].
//! - Under stress (`limits.stressPercent` of `maxConnections` admitted) a session before MAIL
//!   FROM waits at most `timeouts.stressCommandSecs` for a command (Postfix's
//!   `smtpd_timeout = ${stress?10}{300}`), also a wait that began before the stress did.
//! - A ticket releases its counts exactly once, when dropped or when shed, whichever is first.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::sync::watch;

use crate::config::FleetSettings;
use crate::live_config::LiveConfig;
use crate::metrics::Metrics;
use crate::reply::Reply;

/// What a shed session is told before it is closed.
pub const SHED_REPLY: Reply = Reply::new(
    421,
    [4, 7, 0],
    "Too many connections, closing an idle session; try again later",
);

/// How long a shed session may take to notice (it may be in a TLS handshake or a write) before
/// the listener drops it; short, because the slot has already been given to someone else.
pub const SHED_GRACE: Duration = Duration::from_secs(2);

/// Whether a client may use the reserved slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// In `internalSenders.ipRanges` or an Inbound connector's `senderIPRanges`.
    Priority,
    General,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Priority => "priority",
            Class::General => "general",
        }
    }

    fn index(self) -> usize {
        match self {
            Class::Priority => 0,
            Class::General => 1,
        }
    }
}

/// The admission knobs of the fleet settings, resolved to counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_total: usize,
    pub max_per_client: usize,
    /// Slots only priority clients may use.
    pub reserved: usize,
    /// Admitted sessions from which the listener is under stress.
    pub stress_at: usize,
    pub shed_after: Duration,
    pub stress_command: Duration,
    pub ipv6_prefix: u8,
}

impl Limits {
    pub fn from_fleet(f: &FleetSettings) -> Limits {
        let l = &f.limits;
        let max_total = l.max_connections;
        let pct = |p: usize| max_total.saturating_mul(p.min(100)) / 100;
        Limits {
            max_total,
            max_per_client: l.max_connections_per_ip,
            reserved: pct(l.reserved_connections_percent),
            // At least one session, so a tiny maxConnections still has a defined stress point.
            stress_at: pct(l.stress_percent).max(1),
            shed_after: Duration::from_secs(f.timeouts.shed_after_secs),
            stress_command: Duration::from_secs(f.timeouts.stress_command_secs),
            ipv6_prefix: l.ipv6_prefix_length.min(128),
        }
    }
}

/// The key per-client limits count by: the canonical IPv4 address, or the IPv6 address cut to
/// `v6_prefix` bits.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// The address ranges of priority clients, merged and sorted so a lookup is a binary search
/// whatever the number of connectors.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrioritySet {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl PrioritySet {
    pub fn new<'a>(ranges: impl IntoIterator<Item = &'a IpNet>) -> PrioritySet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for r in ranges {
            match r {
                IpNet::V4(n) => v4.push(n.trunc()),
                // An IPv4-mapped range is an IPv4 range: clients are canonical.
                IpNet::V6(n) => match n.network().to_ipv4_mapped() {
                    Some(a) if n.prefix_len() >= 96 => {
                        if let Ok(n) = Ipv4Net::new(a, n.prefix_len() - 96) {
                            v4.push(n.trunc());
                        }
                    }
                    _ => v6.push(n.trunc()),
                },
            }
        }
        // Aggregated networks are disjoint, so the only candidate for an address is the last
        // network starting at or before it.
        let mut v4 = Ipv4Net::aggregate(&v4);
        let mut v6 = Ipv6Net::aggregate(&v6);
        v4.sort_by_key(|n| n.network());
        v6.sort_by_key(|n| n.network());
        PrioritySet { v4, v6 }
    }

    /// The ranges that make a client priority under these settings.
    pub fn from_config(rt: &LiveConfig) -> PrioritySet {
        let internal = rt.fleet.internal_senders.ip_ranges.iter();
        let partners = rt
            .connectors
            .inbound
            .iter()
            .flat_map(|c| c.sender_ip_ranges.iter());
        PrioritySet::new(internal.chain(partners))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => last_at_or_before(&self.v4, a, |n| n.network(), |n, a| n.contains(a)),
            IpAddr::V6(a) => last_at_or_before(&self.v6, a, |n| n.network(), |n, a| n.contains(a)),
        }
    }
}

fn last_at_or_before<N, A: Ord + Copy>(
    nets: &[N],
    addr: A,
    start: impl Fn(&N) -> A,
    contains: impl Fn(&N, &A) -> bool,
) -> bool {
    let i = nets.partition_point(|n| start(n) <= addr);
    i > 0 && contains(&nets[i - 1], &addr)
}

/// Counts that matter for one admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub total: usize,
    pub general: usize,
    /// Sessions of the newcomer's client key.
    pub client: usize,
}

/// Which classes have a session that may be shed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sheddable {
    pub general: bool,
    pub priority: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `maxConnectionsPerIp` (per prefix for IPv6).
    PerClient,
    /// `maxConnections`, or the unreserved part of it, with nobody to shed.
    Total,
}

impl Refusal {
    pub fn rule(self) -> &'static str {
        match self {
            Refusal::PerClient => "maxConnectionsPerIp",
            Refusal::Total => "maxConnections",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Shed the chosen session of this class ([`pick_victim`]), then admit.
    ShedThenAdmit(Class),
    Refuse(Refusal),
}

/// The admission rule. The per-client limit is never lifted by shedding: a client over it is
/// the flood, not its victim.
pub fn decide(l: &Limits, c: Counts, class: Class, s: Sheddable) -> Decision {
    if c.client >= l.max_per_client {
        return Decision::Refuse(Refusal::PerClient);
    }
    let general_cap = l.max_total.saturating_sub(l.reserved);
    match class {
        Class::General if c.general < general_cap && c.total < l.max_total => Decision::Admit,
        Class::General if s.general => Decision::ShedThenAdmit(Class::General),
        Class::Priority if c.total < l.max_total => Decision::Admit,
        Class::Priority if s.general => Decision::ShedThenAdmit(Class::General),
        Class::Priority if s.priority => Decision::ShedThenAdmit(Class::Priority),
        _ => Decision::Refuse(Refusal::Total),
    }
}

/// Whether the oldest session before MAIL FROM, admitted at `oldest`, may be shed at `now`.
pub fn old_enough(oldest: Option<Instant>, now: Instant, shed_after: Duration) -> bool {
    oldest.is_some_and(|t| now.saturating_duration_since(t) >= shed_after)
}

/// One client key's sessions that may be shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Sessions the client key holds in all.
    pub held: usize,
    /// Its oldest session before MAIL FROM (ids grow with admission order).
    pub oldest_id: u64,
    pub oldest_at: Instant,
}

/// The session to shed for a newcomer whose client key holds `newcomer_held` sessions, if
/// any: fair share first, then age (see the module invariants).
pub fn pick_victim(
    candidates: impl IntoIterator<Item = Candidate>,
    newcomer_held: usize,
    now: Instant,
    shed_after: Duration,
) -> Option<u64> {
    let mut heaviest: Option<Candidate> = None;
    let mut oldest: Option<Candidate> = None;
    for c in candidates {
        if heaviest.is_none_or(|h| {
            (c.held, std::cmp::Reverse(c.oldest_id)) > (h.held, std::cmp::Reverse(h.oldest_id))
        }) {
            heaviest = Some(c);
        }
        if oldest.is_none_or(|o| c.oldest_id < o.oldest_id) {
            oldest = Some(c);
        }
    }
    if let Some(h) = heaviest
        && h.held >= newcomer_held + 2
    {
        return Some(h.oldest_id);
    }
    oldest
        .filter(|o| old_enough(Some(o.oldest_at), now, shed_after))
        .map(|o| o.oldest_id)
}

struct Entry {
    class: Class,
    key: IpAddr,
    ip: IpAddr,
    pre_mail: bool,
    shed: watch::Sender<bool>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    total: usize,
    general: usize,
    per_client: HashMap<IpAddr, usize>,
    /// Live sessions that still count (not shed).
    entries: HashMap<u64, Entry>,
    /// Sessions before MAIL FROM per class and client key, by id (= admission order) with
    /// admission time.
    pre_mail: [HashMap<IpAddr, BTreeMap<u64, Instant>>; 2],
}

impl Table {
    /// The session of `class` to shed for a newcomer holding `newcomer_held` slots.
    fn victim(&self, class: Class, newcomer_held: usize, l: &Limits, now: Instant) -> Option<u64> {
        let candidates = self.pre_mail[class.index()]
            .iter()
            .filter_map(|(key, ids)| {
                let (&oldest_id, &oldest_at) = ids.first_key_value()?;
                Some(Candidate {
                    held: self.per_client.get(key).copied().unwrap_or(0),
                    oldest_id,
                    oldest_at,
                })
            });
        pick_victim(candidates, newcomer_held, now, l.shed_after)
    }

    fn leave_pre_mail(&mut self, class: Class, key: IpAddr, id: u64) {
        let by_key = &mut self.pre_mail[class.index()];
        if let Some(ids) = by_key.get_mut(&key) {
            ids.remove(&id);
            if ids.is_empty() {
                by_key.remove(&key);
            }
        }
    }

    /// Removes a session's counts; returns its entry if it still counted.
    fn release(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.total -= 1;
        if e.class == Class::General {
            self.general -= 1;
        }
        if let Some(n) = self.per_client.get_mut(&e.key) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&e.key);
            }
        }
        self.leave_pre_mail(e.class, e.key, id);
        Some(e)
    }
}

struct CachedSet {
    config: Weak<LiveConfig>,
    set: Arc<PrioritySet>,
}

/// The listener's admission table.
pub struct Admission {
    table: Mutex<Table>,
    /// Mirrors `table.total` so the per-read stress check takes no lock.
    admitted: AtomicUsize,
    stress_at: AtomicUsize,
    stress_command_ms: AtomicU64,
    /// Whether the listener is under stress, for waits that began before it was.
    stress: watch::Sender<bool>,
    priority: Mutex<Option<CachedSet>>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(metrics: Arc<Metrics>) -> Admission {
        Admission {
            table: Mutex::new(Table::default()),
            admitted: AtomicUsize::new(0),
            stress_at: AtomicUsize::new(usize::MAX),
            stress_command_ms: AtomicU64::new(u64::MAX),
            stress: watch::Sender::new(false),
            priority: Mutex::new(None),
            metrics,
        }
    }

    /// The table; a panic elsewhere while it was held leaves counts that are still the best
    /// there are, so serving goes on rather than refusing everyone.
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The priority ranges of `rt`, built once per loaded config.
    fn priority_set(&self, rt: &Arc<LiveConfig>) -> Arc<PrioritySet> {
        let Ok(mut cache) = self.priority.lock() else {
            return Arc::new(PrioritySet::from_config(rt));
        };
        if let Some(c) = cache.as_ref()
            // A Weak keeps its allocation, so while the LiveConfig lives an equal pointer is it.
            && c.config.strong_count() > 0
            && std::ptr::eq(c.config.as_ptr(), Arc::as_ptr(rt))
        {
            return c.set.clone();
        }
        let set = Arc::new(PrioritySet::from_config(rt));
        *cache = Some(CachedSet {
            config: Arc::downgrade(rt),
            set: set.clone(),
        });
        set
    }

    /// Admits `client` (after PROXY protocol) under `rt`'s settings, shedding an old idle
    /// session if that is what it takes.
    pub fn admit_under(
        self: &Arc<Self>,
        rt: &Arc<LiveConfig>,
        client: IpAddr,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let priority = self.priority_set(rt);
        self.admit(&Limits::from_fleet(&rt.fleet), &priority, client, now)
    }

    /// [`Admission::admit_under`] with the settings spelled out.
    pub fn admit(
        self: &Arc<Self>,
        limits: &Limits,
        priority: &PrioritySet,
        client: IpAddr,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let client = client.to_canonical();
        self.stress_at.store(limits.stress_at, Ordering::Relaxed);
        self.stress_command_ms.store(
            u64::try_from(limits.stress_command.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let class = if priority.contains(client) {
            Class::Priority
        } else {
            Class::General
        };
        let key = client_key(client, limits.ipv6_prefix);
        let mut t = self.lock();
        let counts = Counts {
            total: t.total,
            general: t.general,
            client: t.per_client.get(&key).copied().unwrap_or(0),
        };
        // Victims are looked for (a scan of the client keys) only when the listener is full.
        let mut victims = [None, None];
        let mut decision = decide(limits, counts, class, Sheddable::default());
        if decision == Decision::Refuse(Refusal::Total) {
            victims =
                [Class::Priority, Class::General].map(|c| t.victim(c, counts.client, limits, now));
            let sheddable = Sheddable {
                general: victims[Class::General.index()].is_some(),
                priority: victims[Class::Priority.index()].is_some(),
            };
            decision = decide(limits, counts, class, sheddable);
        }
        match decision {
            Decision::Refuse(r) => {
                self.metrics.connection_refused(r.rule(), class.as_str());
                return Err(r);
            }
            Decision::ShedThenAdmit(victim_class) => {
                let victim = victims[victim_class.index()].and_then(|id| t.release(id));
                if let Some(v) = victim {
                    let _ = v.shed.send(true);
                    self.metrics.session_shed(v.class.as_str());
                    tracing::info!(target: "decision", client_ip = %v.ip, rule = "shed", outcome = "shed",
                        class = v.class.as_str(), newcomer = %client,
                        "listener full: a session before MAIL FROM shed for a new client");
                }
            }
            Decision::Admit => {}
        }
        let id = t.next_id;
        t.next_id += 1;
        let (tx, rx) = watch::channel(false);
        t.entries.insert(
            id,
            Entry {
                class,
                key,
                ip: client,
                pre_mail: true,
                shed: tx,
            },
        );
        t.total += 1;
        if class == Class::General {
            t.general += 1;
        }
        *t.per_client.entry(key).or_insert(0) += 1;
        t.pre_mail[class.index()]
            .entry(key)
            .or_default()
            .insert(id, now);
        self.set_admitted(t.total);
        Ok(Ticket {
            owner: Some(self.clone()),
            id,
            class,
            pre_mail: Arc::new(AtomicBool::new(true)),
            shed: rx,
        })
    }

    /// Sessions that count now (shed ones do not).
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Relaxed)
    }

    pub fn stressed(&self) -> bool {
        self.admitted() >= self.stress_at.load(Ordering::Relaxed)
    }

    /// Called with the table locked, so the stress flag follows the count in order.
    fn set_admitted(&self, total: usize) {
        self.admitted.store(total, Ordering::Relaxed);
        let stressed = self.stressed();
        self.stress
            .send_if_modified(|s| std::mem::replace(s, stressed) != stressed);
    }

    fn stress_command(&self) -> Duration {
        Duration::from_millis(self.stress_command_ms.load(Ordering::Relaxed))
    }

    fn release(&self, id: u64) {
        let mut t = self.lock();
        t.release(id);
        self.set_admitted(t.total);
    }

    fn enter_pre_mail(&self, id: u64, now: Instant) {
        let mut t = self.lock();
        if let Some(e) = t.entries.get_mut(&id)
            && !std::mem::replace(&mut e.pre_mail, true)
        {
            let (class, key) = (e.class, e.key);
            t.pre_mail[class.index()]
                .entry(key)
                .or_default()
                .insert(id, now);
        }
    }

    fn leave_pre_mail(&self, id: u64) {
        let mut t = self.lock();
        if let Some(e) = t.entries.get_mut(&id)
            && std::mem::take(&mut e.pre_mail)
        {
            let (class, key) = (e.class, e.key);
            t.leave_pre_mail(class, key, id);
        }
    }
}

/// Why [`Ticket::interrupted`] ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// The slot went to a new client: reply [`SHED_REPLY`] and close.
    Shed,
    /// Under stress, this wait before MAIL FROM lasted `stressCommandSecs`: reply as to a
    /// command timeout (`421 4.4.2`) and close.
    StressTimeout,
}

/// A session's hold on its slot and its hooks into admission. Dropping it frees the slot.
///
/// The session calls [`Ticket::in_transaction`] when it accepts MAIL FROM, asks
/// [`Ticket::command_timeout`] before each wait for a command, and races each read against
/// [`Ticket::interrupted`].
pub struct Ticket {
    owner: Option<Arc<Admission>>,
    id: u64,
    class: Class,
    pre_mail: Arc<AtomicBool>,
    shed: watch::Receiver<bool>,
}

impl Ticket {
    /// A ticket that counts nowhere and is never shed (in-memory sessions, tests).
    pub fn detached() -> Ticket {
        let (_, rx) = watch::channel(false);
        Ticket {
            owner: None,
            id: 0,
            class: Class::General,
            pre_mail: Arc::new(AtomicBool::new(true)),
            shed: rx,
        }
    }

    pub fn class(&self) -> Class {
        self.class
    }

    /// The session has reached MAIL FROM: it is no longer shed nor given the stress timeout.
    pub fn in_transaction(&self) {
        if self.pre_mail.swap(false, Ordering::Relaxed)
            && let Some(a) = &self.owner
        {
            a.leave_pre_mail(self.id);
        }
    }

    /// The transaction ended (RSET, the final reply to DATA, EHLO): until its next MAIL FROM
    /// the session is treated like one that never sent one — sheddable when the listener is
    /// full, and given the stress timeout — so a flood that sends MAIL FROM once and then idles
    /// cannot keep its slots out of reach.
    pub fn idle(&self) {
        if !self.pre_mail.swap(true, Ordering::Relaxed)
            && let Some(a) = &self.owner
        {
            a.enter_pre_mail(self.id, Instant::now());
        }
    }

    /// The timeout for the next wait for a command: `configured`, or the stress timeout if the
    /// listener is under stress and this session has not reached MAIL FROM.
    pub fn command_timeout(&self, configured: Duration) -> Duration {
        match &self.owner {
            Some(a) if self.pre_mail.load(Ordering::Relaxed) && a.stressed() => {
                let ms = a.stress_command_ms.load(Ordering::Relaxed);
                configured.min(Duration::from_millis(ms))
            }
            _ => configured,
        }
    }

    pub fn is_shed(&self) -> bool {
        *self.shed.borrow()
    }

    /// Completes when a wait that starts now must end: the session was shed, or the listener
    /// is (or comes) under stress while this session, before MAIL FROM, has waited
    /// `stressCommandSecs`. Create it when the wait starts.
    pub fn interrupted(&self) -> impl Future<Output = Interrupt> + Send + 'static {
        let start = tokio::time::Instant::now();
        let mut shed = self.shed.clone();
        let pre_mail = self.pre_mail.clone();
        let stress = self
            .owner
            .as_ref()
            .map(|a| (a.stress.subscribe(), a.stress_command()));
        async move {
            let Some((mut stress, limit)) = stress else {
                return Interrupt::Shed.after(shed).await;
            };
            let mut stress_open = true;
            loop {
                if *shed.borrow_and_update() {
                    return Interrupt::Shed;
                }
                let deadline = (*stress.borrow_and_update() && pre_mail.load(Ordering::Relaxed))
                    .then(|| start.checked_add(limit))
                    .flatten();
                tokio::select! {
                    r = shed.changed() => {
                        if r.is_err() {
                            // Released without being shed: the session is over anyway.
                            std::future::pending::<()>().await;
                        }
                    }
                    r = stress.changed(), if stress_open => stress_open = r.is_ok(),
                    _ = sleep_until_some(deadline) => return Interrupt::StressTimeout,
                }
            }
        }
    }

    /// Completes when this session has been shed; never, for a session that is not.
    pub fn shed(&self) -> impl Future<Output = ()> + Send + 'static {
        let rx = self.shed.clone();
        async move {
            Interrupt::Shed.after(rx).await;
        }
    }
}

impl Interrupt {
    /// `self` once `rx` turns true; never if it does not (a sender dropped without shedding
    /// means the session is over anyway).
    async fn after(self, mut rx: watch::Receiver<bool>) -> Interrupt {
        loop {
            if *rx.borrow_and_update() {
                return self;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(a) = &self.owner {
            a.release(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_total: 1000,
            max_per_client: 20,
            reserved: 100,
            stress_at: 800,
            shed_after: Duration::from_secs(5),
            stress_command: Duration::from_secs(10),
            ipv6_prefix: 64,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_keyed_by_prefix_and_mapped_v4_by_address() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1"), 64),
            client_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 64)
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1"), 64),
            client_key(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(client_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(
            client_key(ip("2001:db8:ffff::1"), 48),
            ip("2001:db8:ffff::")
        );
        assert_eq!(client_key(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(client_key(ip("::1"), 64), ip("::"));
        // IPv4, plain or mapped, is never cut.
        assert_eq!(client_key(ip("::ffff:127.0.0.7"), 64), ip("127.0.0.7"));
        assert_eq!(client_key(ip("192.0.2.9"), 64), ip("192.0.2.9"));
    }

    #[test]
    fn limits_from_default_fleet() {
        let f: FleetSettings = serde_json::from_value(serde_json::json!({
            "hostname": "gw.test",
            "serverCertificate": {"certFile": "c", "keyFile": "k"},
            "upstream": {"host": "mail.test"},
        }))
        .unwrap();
        assert_eq!(Limits::from_fleet(&f), limits());
        let mut small = f.clone();
        small.limits.max_connections = 2;
        let l = Limits::from_fleet(&small);
        assert_eq!((l.reserved, l.stress_at), (0, 1));
    }

    #[test]
    fn priority_set_merges_ranges_and_finds_members() {
        let ranges: Vec<IpNet> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.0/25",
            "192.0.2.128/25",
            "198.51.100.7/32",
            "2001:db8:5::/48",
            "::ffff:203.0.113.0/120",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let s = PrioritySet::new(&ranges);
        for yes in [
            "10.200.3.4",
            "192.0.2.0",
            "192.0.2.255",
            "198.51.100.7",
            "::ffff:198.51.100.7",
            "2001:db8:5:ffff::1",
            "203.0.113.9",
        ] {
            assert!(s.contains(ip(yes)), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.0.3.0",
            "198.51.100.8",
            "2001:db8:6::1",
            "::1",
        ] {
            assert!(!s.contains(ip(no)), "{no}");
        }
        assert!(!PrioritySet::default().contains(ip("10.0.0.1")));
    }

    #[test]
    fn decisions_reserve_slots_and_shed_only_what_may_be_shed() {
        let l = limits();
        let none = Sheddable::default();
        let gen_old = Sheddable {
            general: true,
            priority: false,
        };
        let prio_old = Sheddable {
            general: false,
            priority: true,
        };
        let c = |total, general, client| Counts {
            total,
            general,
            client,
        };
        use Class::*;
        use Decision::*;
        // Room for everyone.
        assert_eq!(decide(&l, c(0, 0, 0), General, none), Admit);
        // The per-client limit is absolute.
        assert_eq!(
            decide(&l, c(5, 5, 20), Priority, gen_old),
            Refuse(Refusal::PerClient)
        );
        // General clients stop at 900 of 1000; priority clients use the reserve.
        assert_eq!(
            decide(&l, c(900, 900, 0), General, none),
            Refuse(Refusal::Total)
        );
        assert_eq!(decide(&l, c(900, 900, 0), Priority, none), Admit);
        assert_eq!(decide(&l, c(999, 900, 0), Priority, none), Admit);
        // A full general pool: a general newcomer sheds an old general session.
        assert_eq!(
            decide(&l, c(900, 900, 0), General, gen_old),
            ShedThenAdmit(General)
        );
        // Priority sessions over the reserve fill the total: general newcomers shed general.
        assert_eq!(
            decide(&l, c(1000, 850, 0), General, gen_old),
            ShedThenAdmit(General)
        );
        // A general newcomer never sheds a priority session.
        assert_eq!(
            decide(&l, c(1000, 850, 0), General, prio_old),
            Refuse(Refusal::Total)
        );
        // A priority newcomer sheds general first, then priority.
        assert_eq!(
            decide(
                &l,
                c(1000, 900, 0),
                Priority,
                Sheddable {
                    general: true,
                    priority: true
                }
            ),
            ShedThenAdmit(General)
        );
        assert_eq!(
            decide(&l, c(1000, 0, 0), Priority, prio_old),
            ShedThenAdmit(Priority)
        );
        assert_eq!(
            decide(&l, c(1000, 0, 0), Priority, none),
            Refuse(Refusal::Total)
        );
        // No reserve (tiny maxConnections): plain limits.
        let tiny = Limits {
            max_total: 2,
            reserved: 0,
            ..l
        };
        assert_eq!(decide(&tiny, c(1, 1, 0), General, none), Admit);
        assert_eq!(
            decide(&tiny, c(2, 2, 0), General, none),
            Refuse(Refusal::Total)
        );
    }

    #[test]
    fn only_sessions_older_than_shed_after_may_be_shed() {
        let t0 = Instant::now();
        let five = Duration::from_secs(5);
        assert!(!old_enough(None, t0, five));
        assert!(!old_enough(Some(t0), t0 + Duration::from_secs(4), five));
        assert!(old_enough(Some(t0), t0 + five, five));
        assert!(old_enough(Some(t0), t0, Duration::ZERO));
    }

    #[test]
    fn victims_by_fair_share_then_age() {
        let t0 = Instant::now();
        let five = Duration::from_secs(5);
        let c = |held, oldest_id, age: u64| Candidate {
            held,
            oldest_id,
            oldest_at: t0 - Duration::from_secs(age),
        };
        // A newcomer with nothing takes a slot from the heaviest client, however young.
        assert_eq!(
            pick_victim([c(1, 1, 60), c(18, 7, 0), c(17, 3, 0)], 0, t0, five),
            Some(7)
        );
        // Ties: the heaviest client's session that is oldest.
        assert_eq!(
            pick_victim([c(18, 9, 0), c(18, 4, 0)], 0, t0, five),
            Some(4)
        );
        // A flood client holding 17 cannot take from one holding 18 (it would just shuffle);
        // it gets only a session past shedAfterSecs, the oldest.
        assert_eq!(pick_victim([c(18, 9, 1), c(18, 4, 2)], 17, t0, five), None);
        assert_eq!(
            pick_victim([c(18, 9, 1), c(18, 4, 6)], 17, t0, five),
            Some(4)
        );
        // Equals (one session each): only age.
        assert_eq!(pick_victim([c(1, 1, 0), c(1, 2, 0)], 0, t0, five), None);
        assert_eq!(pick_victim([c(1, 1, 5), c(1, 2, 9)], 0, t0, five), Some(1));
        assert_eq!(pick_victim([], 0, t0, five), None);
    }

    #[tokio::test]
    async fn a_session_whose_transaction_ended_is_sheddable_again() {
        let l = Limits {
            max_total: 4,
            max_per_client: 4,
            reserved: 0,
            stress_at: 2,
            ..limits()
        };
        let none: Vec<IpNet> = vec![];
        let prio = PrioritySet::new(&none);
        let a = Arc::new(Admission::new(Arc::new(Metrics::new())));
        let t0 = Instant::now();
        let g = |i: u8| IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, i));
        let s: Vec<Ticket> = (0..4)
            .map(|i| a.admit(&l, &prio, g(i), t0).unwrap())
            .collect();
        for t in &s {
            t.in_transaction();
        }
        let configured = Duration::from_secs(300);
        // Every session inside a transaction: nothing to shed, no stress timeout.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(a.admit(&l, &prio, g(9), later).err(), Some(Refusal::Total));
        assert_eq!(s[2].command_timeout(configured), configured);
        // Session 2's transaction ends: it waits for its next MAIL FROM like a new session.
        s[2].idle();
        s[2].idle();
        assert_eq!(s[2].command_timeout(configured), Duration::from_secs(10));
        let newcomer = a.admit(&l, &prio, g(9), later).unwrap();
        assert!(s[2].is_shed());
        assert!(!s[1].is_shed() && !s[3].is_shed());
        assert_eq!(a.admitted(), 4);
        // A session idle and then in a transaction again is exempt again.
        s[3].idle();
        s[3].in_transaction();
        assert_eq!(a.admit(&l, &prio, g(10), later).err(), Some(Refusal::Total));
        drop(newcomer);
    }

    #[tokio::test]
    async fn table_sheds_the_oldest_pre_mail_session_and_counts_stay_right() {
        let l = Limits {
            max_total: 10,
            max_per_client: 3,
            reserved: 2,
            stress_at: 5,
            ..limits()
        };
        let ranges: Vec<IpNet> = vec![
            "10.9.0.0/16".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ];
        let prio = PrioritySet::new(&ranges);
        let a = Arc::new(Admission::new(Arc::new(Metrics::new())));
        let admit = |ip: IpAddr, now: Instant| a.admit(&l, &prio, ip, now);
        let t0 = Instant::now();
        let g = |i: u8| IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, i));
        // 8 general sessions fill the unreserved part (10 - 20 %).
        let mut general: Vec<Ticket> = (0..8).map(|i| admit(g(i), t0).unwrap()).collect();
        assert_eq!(a.admitted(), 8);
        assert!(a.stressed());
        assert_eq!(
            general[0].command_timeout(Duration::from_secs(300)),
            Duration::from_secs(10)
        );
        // The 9th general client: nobody old enough yet.
        assert_eq!(admit(g(50), t0).err(), Some(Refusal::Total));
        // Priority clients (a connector's range, an internal sender) use the reserve.
        let p1 = admit(ip("192.0.2.1"), t0).unwrap();
        let p2 = admit(ip("::ffff:10.9.1.1"), t0).unwrap();
        assert_eq!((p1.class(), p2.class()), (Class::Priority, Class::Priority));
        // Session 0 reaches MAIL FROM: exempt from shedding and from the stress timeout.
        general[0].in_transaction();
        assert_eq!(
            general[0].command_timeout(Duration::from_secs(300)),
            Duration::from_secs(300)
        );
        // Later, a new general client sheds the oldest pre-MAIL general session (1, not 0).
        let later = t0 + Duration::from_secs(6);
        let newcomer = admit(g(60), later).unwrap();
        assert!(!general[0].is_shed());
        assert!(general[1].is_shed());
        assert!(!general[2].is_shed());
        tokio::time::timeout(Duration::from_secs(1), general[1].shed())
            .await
            .expect("the shed future fires");
        assert_eq!(a.admitted(), 10);
        // Dropping a shed ticket does not release twice.
        general.remove(1);
        assert_eq!(a.admitted(), 10);
        // Full: a priority newcomer sheds general (2 is now the oldest pre-MAIL one).
        let p3 = admit(ip("192.0.2.2"), later).unwrap();
        assert!(general[1].is_shed());
        assert_eq!(a.admitted(), 10);
        drop((p1, p2, p3, newcomer));
        general.clear();
        assert_eq!(a.admitted(), 0);
        // Everything released: counts back to zero, per-client limit works from scratch.
        let same: Vec<Ticket> = (0..3).map(|_| admit(g(1), later).unwrap()).collect();
        assert_eq!(admit(g(1), later).err(), Some(Refusal::PerClient));
        assert!(!a.stressed());
        assert_eq!(
            same[0].command_timeout(Duration::from_secs(300)),
            Duration::from_secs(300)
        );
        // IPv6: one /64 is one client.
        let v6: Vec<Ticket> = (1..=3)
            .map(|i| admit(ip(&format!("2001:db8:7:1::{i}")), later).unwrap())
            .collect();
        assert_eq!(
            admit(ip("2001:db8:7:1:ffff::9"), later).err(),
            Some(Refusal::PerClient)
        );
        assert!(admit(ip("2001:db8:7:2::1"), later).is_ok());
        drop(v6);
    }

    #[test]
    fn a_fresh_client_takes_a_slot_from_the_heaviest_client_at_once() {
        let l = Limits {
            max_total: 4,
            max_per_client: 3,
            reserved: 0,
            ..limits()
        };
        let prio = PrioritySet::default();
        let a = Arc::new(Admission::new(Arc::new(Metrics::new())));
        let now = Instant::now();
        let heavy = ip("198.51.100.1");
        let held: Vec<Ticket> = (0..3)
            .map(|_| a.admit(&l, &prio, heavy, now).unwrap())
            .collect();
        let light = a.admit(&l, &prio, ip("198.51.100.2"), now).unwrap();
        let fresh = a.admit(&l, &prio, ip("198.51.100.3"), now).unwrap();
        assert!(held[0].is_shed() && !held[1].is_shed() && !light.is_shed());
        // 2 / 1 / 1: the heavy client still holds two more than a newcomer.
        let fourth = a.admit(&l, &prio, ip("198.51.100.4"), now).unwrap();
        assert!(held[1].is_shed() && !held[2].is_shed());
        // 1 / 1 / 1 / 1: nobody holds more, nobody is old: refused.
        assert_eq!(
            a.admit(&l, &prio, ip("198.51.100.5"), now).err(),
            Some(Refusal::Total)
        );
        drop((held, light, fresh, fourth));
        assert_eq!(a.admitted(), 0);
    }

    #[tokio::test]
    async fn stress_cuts_waits_that_began_before_it_but_not_transactions() {
        let l = Limits {
            max_total: 10,
            max_per_client: 10,
            reserved: 0,
            stress_at: 3,
            shed_after: Duration::ZERO,
            stress_command: Duration::from_millis(200),
            ipv6_prefix: 64,
        };
        let prio = PrioritySet::default();
        let a = Arc::new(Admission::new(Arc::new(Metrics::new())));
        let now = Instant::now();
        let c = |i: u8| IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, i));
        let idle = a.admit(&l, &prio, c(1), now).unwrap();
        let busy = a.admit(&l, &prio, c(2), now).unwrap();
        busy.in_transaction();
        // Not under stress yet: the waits start with the configured timeout.
        assert_eq!(
            idle.command_timeout(Duration::from_secs(300)),
            Duration::from_secs(300)
        );
        let idle_wait = tokio::spawn(idle.interrupted());
        let busy_wait = busy.interrupted();
        let third = a.admit(&l, &prio, c(3), now).unwrap();
        assert!(a.stressed());
        let got = tokio::time::timeout(Duration::from_secs(5), idle_wait)
            .await
            .expect("a pre-MAIL wait ends under stress")
            .unwrap();
        assert_eq!(got, Interrupt::StressTimeout);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), busy_wait)
                .await
                .is_err(),
            "a session past MAIL FROM keeps its configured timeout"
        );
        // Shedding interrupts a wait too (shed_after 0: the oldest pre-MAIL one, `idle`).
        let shed_wait = idle.interrupted();
        let l_full = Limits { max_total: 3, ..l };
        let fourth = a.admit(&l_full, &prio, c(4), now).unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), shed_wait)
                .await
                .expect("shed ends the wait"),
            Interrupt::Shed
        );
        drop((third, fourth));
    }

    #[test]
    fn detached_tickets_are_inert() {
        let t = Ticket::detached();
        t.in_transaction();
        assert!(!t.is_shed());
        assert_eq!(
            t.command_timeout(Duration::from_secs(7)),
            Duration::from_secs(7)
        );
    }
}
