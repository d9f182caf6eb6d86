//! The next-hop side of one SMTP transaction, and the session's idle connection pool.
//!
//! Invariants (docs/gateway.md, "Multi-recipient transactions"):
//! 1. A recipient is sent only over a connection opened for its own route. The transaction
//!    holds at most one connection, tagged with its route; the pool hands a connection out
//!    only for the route it was opened for.
//! 2. The route is pinned by the first recipient the next hop *accepts* (policy refuses other
//!    routes from then on). A refused recipient pins nothing; when the next recipient needs
//!    another route, the held connection is reset and parked, so it cannot carry it.
//! 3. The ledger lists the recipients the next hop accepted on the held connection. If that
//!    connection is lost before the message is streamed, the transaction reconnects once and
//!    replays MAIL and every ledger recipient; unless all are accepted again it is *broken*:
//!    later recipients and DATA get `451 4.4.1`. So a `250` to the final dot always means the
//!    next hop accepted MAIL and exactly the ledger on the connection that carried the message,
//!    and a lost connection never gives a `5xx`.
//! 4. A pooled connection found dead when MAIL is sent (I/O error, timeout, `421`) is replaced
//!    once by a fresh one without the client noticing.
//! 5. A `3xx` reply to MAIL or RCPT (or a 2xx/3xx other than `354` to DATA) is a protocol
//!    error, never acceptance: `451 4.5.0` and the connection is dropped.
//! 6. A next hop's `421` (closing the connection) is a lost connection, passed on as `451`
//!    with its enhanced code: as `421` it would make the client drop its whole session.
//! 7. A REQUIRETLS message goes only over a connection authenticated by chain and name to a
//!    host offering REQUIRETLS; a host that does not qualify is skipped for the next one, and
//!    `550 5.7.30` is the answer only when every host reached was refused so (RFC 8689 4.2.1).

use crate::live_config::LiveConfig;
use crate::policy::Route;
use crate::reply::next_hop::{protocol_error, recipients_lost, requiretls_not_met, unreachable};
use crate::reply::{Reply, fixed};

use super::client::{HopConnection, HopReply, OpenError, mx_hosts};

/// What every next hop of the transaction gets in MAIL FROM.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The sender exactly as the client gave it (dequoted by the parser).
    pub sender: String,
    /// `SIZE=` from the client; 0 when absent.
    pub size: usize,
    pub eightbit: bool,
    pub smtputf8: bool,
    /// RFC 8689 `REQUIRETLS`: relayed only over an authenticated TLS connection to a next hop
    /// that offers REQUIRETLS, with the parameter passed on.
    pub requiretls: bool,
}

/// The label of a route in replies and logs: `upstream` or the Outbound connector's name.
pub fn route_label(rt: &LiveConfig, route: &Route) -> String {
    match route {
        Route::Upstream => "upstream".into(),
        Route::Outbound(i) | Route::OutboundMx(i, _) => rt
            .connectors
            .outbound
            .get(*i)
            .map_or_else(|| "unknown".into(), |c| c.name.clone()),
    }
}

/// The session's idle next-hop connection, kept between transactions. One slot: parking
/// another connection closes the one parked before.
#[derive(Default)]
pub struct IdlePool {
    slot: Option<(Route, HopConnection)>,
}

impl IdlePool {
    /// The parked connection if it was opened for `route`; a connection of another route stays.
    fn take(&mut self, route: &Route) -> Option<HopConnection> {
        match &self.slot {
            Some((r, _)) if r == route => self.slot.take().map(|(_, hop)| hop),
            _ => None,
        }
    }

    /// Parks `hop`; an evicted connection is closed in the background, so neither the client's
    /// reply nor its session slot waits for a next hop's QUIT.
    fn park(&mut self, route: Route, hop: HopConnection) {
        if let Some((_, old)) = self.slot.replace((route, hop)) {
            tokio::spawn(old.quit());
        }
    }

    /// Closes the parked connection in the background (end of session).
    pub fn close(&mut self) {
        if let Some((_, hop)) = self.slot.take() {
            tokio::spawn(hop.quit());
        }
    }
}

/// How a next hop answered one command.
enum Answer {
    Accepted(HopReply),
    /// 4xx or 5xx: mirrored to the client; the connection is still usable.
    Refused(HopReply),
    /// A reply outside the protocol (3xx to MAIL/RCPT, not 354 to DATA): the connection is
    /// dropped; the reply for the client.
    Protocol(Reply),
    /// I/O error, timeout or end of stream: the connection is gone; the reply for the client.
    Lost(Reply),
}

/// Sends one command: `2xx` means go on for MAIL and RCPT, only `354` for DATA.
async fn exchange(hop: &mut HopConnection, label: &str, cmd: &str, what: &str) -> Answer {
    let reply = hop.command(cmd).await;
    answer(reply, label, what)
}

/// MAIL, then the first RCPT on the same connection: in one write when the next hop offers
/// PIPELINING (RFC 2920; the client's RCPT is answered with the next hop's RCPT reply, so only
/// MAIL can go ahead of it), one after the other otherwise. `Ok` is the RCPT's answer, MAIL
/// having been accepted; `Err` is MAIL's answer when it was not. Every caller closes a
/// connection whose MAIL was not accepted, so a pipelined RCPT's reply is not waited for (a
/// next hop that never answers it would hold the client's reply for the whole timeout).
async fn mail_then_rcpt(
    hop: &mut HopConnection,
    label: &str,
    mail: &str,
    rcpt: &str,
) -> Result<Answer, Answer> {
    if !hop.caps.pipelining {
        return match exchange(hop, label, mail, "MAIL").await {
            Answer::Accepted(_) => Ok(exchange(hop, label, rcpt, "RCPT").await),
            other => Err(other),
        };
    }
    hop.queue(mail.as_bytes());
    let m = match hop.send(rcpt.as_bytes()).await {
        Ok(()) => answer(hop.read_reply().await, label, "MAIL"),
        Err(e) => answer(Err(e), label, "MAIL"),
    };
    match m {
        Answer::Accepted(_) => Ok(answer(hop.read_reply().await, label, "RCPT")),
        Answer::Refused(_) | Answer::Protocol(_) | Answer::Lost(_) => Err(m),
    }
}

/// A next hop's reply (or the failure to get one) as an [`Answer`] to `what`.
fn answer(reply: std::io::Result<HopReply>, label: &str, what: &str) -> Answer {
    let data = what == "DATA";
    match reply {
        Ok(r) if !data && (200..300).contains(&r.code) => Answer::Accepted(r),
        Ok(r) if data && r.code == 354 => Answer::Accepted(r),
        // 421: the next hop is closing the connection. Passed on as 421 it would make the
        // client drop its whole session (RFC 5321 3.8), so it is a lost connection here.
        Ok(r) if r.code == 421 => Answer::Lost(closing(label, &r)),
        Ok(r) if r.code >= 400 => Answer::Refused(r),
        Ok(r) => Answer::Protocol(protocol_error(
            label,
            &format!("unexpected reply {} to {what}", r.code),
        )),
        Err(e) => Answer::Lost(unreachable(
            label,
            &format!("connection lost at {what} ({e})"),
        )),
    }
}

/// A next hop's `421` as the client sees it: `451` with the next hop's enhanced code and text.
fn closing(label: &str, r: &HopReply) -> Reply {
    let esc = r.esc.filter(|e| e[0] == 4).unwrap_or([4, 4, 2]);
    Reply::owned(
        451,
        esc,
        format!(
            "Next hop {label} closed the connection: {}; try again later",
            r.lines.join(" ")
        ),
    )
}

fn mail_command(env: &Envelope, hop: &HopConnection) -> String {
    let mut cmd = format!("MAIL FROM:<{}>", wire_address(&env.sender));
    if hop.caps.size && env.size > 0 {
        cmd.push_str(&format!(" SIZE={}", env.size));
    }
    if hop.caps.eightbit && env.eightbit {
        cmd.push_str(" BODY=8BITMIME");
    }
    if hop.caps.smtputf8 && env.smtputf8 {
        cmd.push_str(" SMTPUTF8");
    }
    if env.requiretls {
        cmd.push_str(" REQUIRETLS");
    }
    cmd.push_str("\r\n");
    cmd
}

/// RFC 8689 4.2.1: why `hop` may not carry a REQUIRETLS message, if it may not. Authenticated
/// means chain and name checked (DomainValidation, DANE, MTA-STS enforce).
fn requiretls_refusal(env: &Envelope, hop: &HopConnection) -> Option<&'static str> {
    if !env.requiretls {
        None
    } else if hop.tls.is_none() {
        Some("the connection is not encrypted")
    } else if !hop.authenticated {
        Some(
            "its certificate is not validated (the connector's TLS level is not DomainValidation and no DANE or MTA-STS enforce policy applied)",
        )
    } else if !hop.caps.requiretls {
        Some("it does not offer REQUIRETLS")
    } else {
        None
    }
}

fn rcpt_command(rcpt: &str) -> String {
    format!("RCPT TO:<{}>\r\n", wire_address(rcpt))
}

/// The address as it goes to the next hop. smtp-proto hands over the local part dequoted, so
/// quote it again unless it is a dot-string (RFC 5321 4.1.2): `"user@evil.test"@example.org`
/// must not become `user@evil.test@example.org`, another address.
pub fn wire_address(addr: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Cow::Borrowed(addr);
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    if !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
    {
        return Cow::Borrowed(addr);
    }
    let mut q = String::with_capacity(addr.len() + 4);
    q.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push_str("\"@");
    q.push_str(domain);
    Cow::Owned(q)
}

/// A fresh connection for `route` (never from the pool) to the first host that qualifies for
/// `env` (RFC 8689 4.2.1: a REQUIRETLS message skips hosts that cannot carry it). The error
/// says whether every host reached was refused for REQUIRETLS (then it is `550 5.7.30`).
async fn open_route(
    rt: &LiveConfig,
    route: &Route,
    env: &Envelope,
) -> Result<HopConnection, OpenError> {
    let label = route_label(rt, route);
    let failed = |reply| OpenError {
        reply,
        refused: false,
    };
    let hop = match route {
        Route::Upstream => Some(&rt.upstream),
        Route::Outbound(i) | Route::OutboundMx(i, _) => rt.outbound.get(*i),
    };
    let Some(hop) = hop else {
        return Err(failed(unreachable(&label, "route not configured")));
    };
    let (helo, timeouts) = (&rt.fleet.hostname, &rt.fleet.timeouts);
    let qualifies =
        |c: &HopConnection| requiretls_refusal(env, c).map(|why| requiretls_not_met(&label, why));
    let mx_targets;
    let targets: &[_] = match route {
        Route::OutboundMx(_, domain) => {
            mx_targets = mx_hosts(hop, domain, &rt.resolver).await.map_err(failed)?;
            &mx_targets
        }
        _ if hop.hosts.is_empty() => {
            // HopConnection::open says why.
            return HopConnection::open(hop, helo, timeouts)
                .await
                .map_err(failed);
        }
        _ => &hop.hosts,
    };
    HopConnection::open_qualifying(hop, targets, helo, timeouts, &qualifies).await
}

/// Ends the next hop's transaction on `hop` and parks it; a hop that does not answer RSET with
/// `250` is closed instead.
async fn release(route: Route, mut hop: HopConnection, pool: &mut IdlePool) {
    match hop.command("RSET\r\n").await {
        Ok(r) if r.code == 250 => pool.park(route, hop),
        _ => hop.abort(),
    }
}

/// The next-hop side of one SMTP transaction.
pub struct RelayTransaction {
    envelope: Envelope,
    pinned: Option<Route>,
    /// Recipients the next hop accepted on `held`, in order.
    ledger: Vec<String>,
    /// The connection with this transaction's MAIL open, and its route.
    held: Option<(Route, HopConnection)>,
    /// Accepted recipients were lost and could not be replayed.
    broken: bool,
}

impl RelayTransaction {
    pub fn new(envelope: Envelope) -> RelayTransaction {
        RelayTransaction {
            envelope,
            pinned: None,
            ledger: Vec::new(),
            held: None,
            broken: false,
        }
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The route fixed by the first accepted recipient.
    pub fn pinned(&self) -> Option<&Route> {
        self.pinned.as_ref()
    }

    /// Recipients the next hop accepted.
    pub fn ledger(&self) -> &[String] {
        &self.ledger
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The outbound TLS policy (`dane`, `mta-sts`, `none`) of the connection holding this
    /// transaction, for the decision log.
    pub fn tls_policy(&self) -> Option<&'static str> {
        self.held.as_ref().map(|(_, hop)| hop.policy)
    }

    /// Sends one recipient (already allowed by policy for `route`) to its route's next hop;
    /// the reply is for the client.
    pub async fn recipient(
        &mut self,
        rt: &LiveConfig,
        pool: &mut IdlePool,
        route: &Route,
        rcpt: &str,
    ) -> Reply {
        let label = route_label(rt, route);
        if self.broken {
            return recipients_lost(&label);
        }
        if self.pinned.as_ref().is_some_and(|p| p != route) {
            // Policy already refuses this; kept here because releasing the held connection
            // would drop the accepted recipients.
            return fixed::ROUTE_SPLIT;
        }
        // The first recipient of a connection goes with its MAIL (pipelined when offered).
        let mut first = None;
        if self.held.as_ref().is_none_or(|(r, _)| r != route) {
            // The pooled connection for this route is taken first, so parking a released one
            // cannot evict it. A held connection of another route exists only while unpinned
            // (policy refuses other routes once pinned); it must not carry this recipient.
            let pooled = pool.take(route);
            if let Some((held_route, hop)) = self.held.take() {
                release(held_route, hop, pool).await;
            }
            match self.open_with_mail(rt, pooled, route, &label, rcpt).await {
                Ok((hop, answer)) => {
                    self.held = Some((route.clone(), hop));
                    first = Some(answer);
                }
                Err(reply) => return reply,
            }
        }
        let Some((_, hop)) = self.held.as_mut() else {
            return unreachable(&label, "internal state error");
        };
        let answer = match first {
            Some(a) => a,
            None => exchange(hop, &label, &rcpt_command(rcpt), "RCPT").await,
        };
        let lost = match answer {
            Answer::Accepted(r) => return self.accept(route, rcpt, &r),
            Answer::Refused(r) => return r.mirror([1, 5]),
            Answer::Protocol(reply) | Answer::Lost(reply) => reply,
        };
        self.drop_held();
        if self.ledger.is_empty() {
            return lost;
        }
        tracing::warn!(next_hop = %label, recipients = self.ledger.len(), reply = %lost,
            "next hop connection lost with accepted recipients; reconnecting to replay them");
        let Some(mut hop) = self.replay(rt, route, &label).await else {
            return recipients_lost(&label);
        };
        match exchange(&mut hop, &label, &rcpt_command(rcpt), "RCPT").await {
            Answer::Accepted(r) => {
                self.held = Some((route.clone(), hop));
                self.accept(route, rcpt, &r)
            }
            Answer::Refused(r) => {
                self.held = Some((route.clone(), hop));
                r.mirror([1, 5])
            }
            Answer::Protocol(reply) | Answer::Lost(reply) => {
                hop.abort();
                self.broken = true;
                reply
            }
        }
    }

    fn accept(&mut self, route: &Route, rcpt: &str, r: &HopReply) -> Reply {
        self.ledger.push(rcpt.to_string());
        self.pinned = Some(route.clone());
        r.mirror([1, 5])
    }

    fn drop_held(&mut self) {
        if let Some((_, hop)) = self.held.take() {
            hop.abort();
        }
    }

    /// A connection for `route` with MAIL accepted and `rcpt` sent, with the next hop's answer
    /// to it: the pooled one if it is for this route (replaced once by a fresh one if it turns
    /// out dead at MAIL), else a fresh one.
    async fn open_with_mail(
        &self,
        rt: &LiveConfig,
        pooled: Option<HopConnection>,
        route: &Route,
        label: &str,
        rcpt: &str,
    ) -> Result<(HopConnection, Answer), Reply> {
        // A pooled connection that cannot carry a REQUIRETLS message is closed; a fresh one
        // may reach another host that can.
        let pooled = match pooled {
            Some(hop) if requiretls_refusal(&self.envelope, &hop).is_some() => {
                hop.quit().await;
                None
            }
            other => other,
        };
        let rcpt = rcpt_command(rcpt);
        if let Some(mut hop) = pooled {
            let mail = mail_command(&self.envelope, &hop);
            match mail_then_rcpt(&mut hop, label, &mail, &rcpt).await {
                Ok(answer) => return Ok((hop, answer)),
                Err(Answer::Refused(r)) => {
                    hop.quit().await;
                    return Err(r.mirror([1, 0]));
                }
                Err(Answer::Protocol(reply)) => {
                    hop.abort();
                    return Err(reply);
                }
                Err(Answer::Lost(_) | Answer::Accepted(_)) => {
                    // Closed while idle (timeout, restart, 421): replaced once, unnoticed.
                    tracing::debug!(next_hop = %label, "pooled connection found dead; opening a new one");
                    hop.abort();
                }
            }
        }
        let mut hop = match open_route(rt, route, &self.envelope).await {
            Ok(hop) => hop,
            Err(e) => {
                if e.refused {
                    tracing::warn!(next_hop = %label, reply = %e.reply, "REQUIRETLS message refused: no next hop host qualifies");
                    crate::tls_policy::engine::count(label, "requiretls", "refused");
                }
                return Err(e.reply);
            }
        };
        let mail = mail_command(&self.envelope, &hop);
        match mail_then_rcpt(&mut hop, label, &mail, &rcpt).await {
            Ok(answer) => {
                if self.envelope.requiretls {
                    crate::tls_policy::engine::count(label, "requiretls", "relayed");
                }
                Ok((hop, answer))
            }
            Err(Answer::Refused(r)) => {
                hop.quit().await;
                Err(r.mirror([1, 0]))
            }
            Err(Answer::Protocol(reply) | Answer::Lost(reply)) => {
                hop.abort();
                Err(reply)
            }
            Err(Answer::Accepted(_)) => {
                hop.abort();
                Err(unreachable(label, "internal state error"))
            }
        }
    }

    /// A fresh connection with MAIL and every ledger recipient accepted again, or `None` (the
    /// transaction is then broken).
    async fn replay(
        &mut self,
        rt: &LiveConfig,
        route: &Route,
        label: &str,
    ) -> Option<HopConnection> {
        let result = async {
            let mut hop = open_route(rt, route, &self.envelope).await.ok()?;
            let mail = mail_command(&self.envelope, &hop);
            if !matches!(
                exchange(&mut hop, label, &mail, "MAIL").await,
                Answer::Accepted(_)
            ) {
                hop.quit().await;
                return None;
            }
            for rcpt in &self.ledger {
                match exchange(&mut hop, label, &rcpt_command(rcpt), "RCPT").await {
                    Answer::Accepted(_) => {}
                    Answer::Refused(_) => {
                        hop.quit().await;
                        return None;
                    }
                    Answer::Protocol(_) | Answer::Lost(_) => {
                        hop.abort();
                        return None;
                    }
                }
            }
            Some(hop)
        }
        .await;
        if result.is_none() {
            tracing::warn!(next_hop = %label, recipients = self.ledger.len(),
                "replaying accepted recipients failed; the transaction can only be retried");
            self.broken = true;
        }
        result
    }

    /// Sends DATA. `Ok` when the next hop answered `354` and the message may be streamed;
    /// `Err(reply)` ends the transaction with that reply (the session answers `554 5.5.1`
    /// itself when no recipient was accepted).
    pub async fn start_data(
        mut self,
        rt: &LiveConfig,
        pool: &mut IdlePool,
    ) -> Result<DataTransfer, Reply> {
        let route = self.pinned.clone().unwrap_or(Route::Upstream);
        let label = route_label(rt, &route);
        if self.broken {
            return Err(recipients_lost(&label));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let hop = match self.held.take() {
                Some((_, hop)) => Some(hop),
                None => self.replay(rt, &route, &label).await,
            };
            let Some(mut hop) = hop else {
                return Err(recipients_lost(&label));
            };
            match exchange(&mut hop, &label, "DATA\r\n", "DATA").await {
                Answer::Accepted(_) => {
                    return Ok(DataTransfer {
                        route,
                        label,
                        hop,
                        recipients: self.ledger.len(),
                        intact: true,
                    });
                }
                Answer::Refused(r) => {
                    release(route, hop, pool).await;
                    return Err(r.mirror([0, 0]));
                }
                Answer::Protocol(reply) => {
                    hop.abort();
                    return Err(reply);
                }
                Answer::Lost(reply) => {
                    hop.abort();
                    if attempts > 1 {
                        return Err(reply);
                    }
                    tracing::warn!(next_hop = %label, recipients = self.ledger.len(), reply = %reply,
                        "next hop connection lost at DATA; reconnecting to replay the recipients");
                }
            }
        }
    }

    /// Ends the transaction (RSET, EHLO, STARTTLS): a held connection is reset and parked for
    /// the next transaction of the same route.
    pub async fn end(mut self, pool: &mut IdlePool) {
        if let Some((route, hop)) = self.held.take() {
            release(route, hop, pool).await;
        }
    }

    /// Ends the transaction with the session: a held connection is closed in the background
    /// (no RSET: nothing will reuse it), so the client's slot is freed at once.
    pub fn close(mut self) {
        if let Some((_, hop)) = self.held.take() {
            tokio::spawn(hop.quit());
        }
    }
}

/// A message being streamed to the next hop after its `354`.
pub struct DataTransfer {
    route: Route,
    label: String,
    hop: HopConnection,
    recipients: usize,
    /// Every write so far reached the next hop.
    intact: bool,
}

impl DataTransfer {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    /// How many recipients the message goes to at the next hop.
    pub fn recipients(&self) -> usize {
        self.recipients
    }

    /// Forwards bytes in the dot-stuffed wire form; after a failed write nothing more is sent.
    pub async fn write(&mut self, bytes: &[u8]) {
        if self.intact {
            self.intact = self.hop.write_data(bytes).await.is_ok();
        }
    }

    /// Drops the connection without the final dot, so the next hop discards the message.
    pub fn abort(self) {
        self.hop.abort();
    }

    /// Sends the final dot; the reply is the next hop's (mirrored), or `451 4.4.1` when the
    /// connection was lost or no reply came in time. A connection that answered goes back to
    /// the pool for its route.
    pub async fn finish(mut self, pool: &mut IdlePool) -> Reply {
        if !self.intact {
            self.hop.abort();
            return unreachable(&self.label, "connection lost during DATA");
        }
        match self.hop.finish_data().await {
            Ok(r) if r.code == 421 => {
                self.hop.abort();
                closing(&self.label, &r)
            }
            Ok(r) if r.code >= 400 || (200..300).contains(&r.code) => {
                pool.park(self.route, self.hop);
                r.mirror([0, 0])
            }
            Ok(r) => {
                self.hop.abort();
                protocol_error(
                    &self.label,
                    &format!("unexpected reply {} to end of data", r.code),
                )
            }
            Err(e) => {
                self.hop.abort();
                unreachable(&self.label, &format!("no reply to end of data ({e})"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire_address;

    #[test]
    fn local_parts_that_are_not_dot_strings_are_quoted_again() {
        assert_eq!(wire_address("a.b@example.org"), "a.b@example.org");
        assert_eq!(
            wire_address("user@evil.test@example.org"),
            "\"user@evil.test\"@example.org"
        );
        assert_eq!(wire_address("a..b@x.org"), "\"a..b\"@x.org");
        assert_eq!(wire_address("say \"hi\"@x.org"), "\"say \\\"hi\\\"\"@x.org");
        assert_eq!(wire_address(""), "");
    }
}
