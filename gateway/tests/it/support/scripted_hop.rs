//! A scripted next hop: a small SMTP server on a loopback address that answers each command as
//! a shared [`Script`] says — accept, a given reply (4xx, 5xx, or a 3xx protocol error), accept
//! and then close the connection, drop the connection without a reply, or stall (never answer
//! again on that connection).
//!
//! Invariants the tests rely on:
//! - The script is addressed by [`Key`] (transaction, hop name, command kind, recipient) and an
//!   attempt number: the n-th time this hop sees that key (over all its connections) it takes
//!   action n of the key's list, and accepts once the list is used up. The transaction is the
//!   local part of the last `MAIL FROM` on the connection, so replays after a reconnect and
//!   reuse of a pooled connection consume well-defined actions.
//! - Commands after a stall, and bytes after the hop closed its side, are recorded but never
//!   consume an action.
//! - A delivery is recorded (before the reply is written) exactly when the hop answers the
//!   final dot with a 2xx, with the recipients it accepted on that connection since `MAIL`.
//! - Closing is a FIN (shutdown of the write side, then reading until the peer closes), never
//!   a reset, so a reply written just before it cannot be discarded by the peer's kernel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What a scripted command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Mail,
    Rcpt,
    Data,
    /// The first line of the message body (only [`Action::Drop`] means anything here).
    Body,
    /// The final `.` of DATA.
    Dot,
    Rset,
}

/// What the hop does with one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// 250 (354 to DATA).
    Accept,
    /// The positive reply, then the hop closes the connection (e.g. a pooled connection the
    /// hop closes while idle).
    AcceptThenClose,
    /// This exact reply line, e.g. `"451 4.3.0 busy"`, `"550 no such user"`, `"354 odd"`.
    Reply(String),
    /// Closes the connection without replying.
    Drop,
    /// Never replies again on this connection (keeps reading until the peer closes).
    Stall,
}

impl Action {
    pub fn reply(s: &str) -> Action {
        Action::Reply(s.to_string())
    }
}

/// Where an action applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Local part of the transaction's `MAIL FROM` (empty outside a transaction).
    pub txn: String,
    /// The hop's name (one hop per route).
    pub hop: String,
    pub kind: Kind,
    /// The recipient for [`Kind::Rcpt`], else empty.
    pub rcpt: String,
}

impl Key {
    pub fn new(txn: &str, hop: &str, kind: Kind, rcpt: &str) -> Key {
        Key {
            txn: txn.to_string(),
            hop: hop.to_string(),
            kind,
            rcpt: rcpt.to_string(),
        }
    }
}

/// The actions of every hop, shared by all of them.
#[derive(Default)]
pub struct Script {
    actions: Mutex<HashMap<Key, Vec<Action>>>,
    seen: Mutex<HashMap<Key, usize>>,
}

impl Script {
    pub fn new() -> Arc<Script> {
        Arc::new(Script::default())
    }

    /// Sets the actions for attempts 0, 1, … of `key` (later attempts accept).
    pub fn set(&self, key: Key, actions: Vec<Action>) {
        self.actions.lock().expect("lock").insert(key, actions);
    }

    /// Shorthand for [`Script::set`].
    pub fn on(&self, txn: &str, hop: &str, kind: Kind, rcpt: &str, actions: Vec<Action>) {
        self.set(Key::new(txn, hop, kind, rcpt), actions);
    }

    /// The action for the next occurrence (attempt) of `key`.
    fn next(&self, key: &Key) -> Action {
        let n = {
            let mut seen = self.seen.lock().expect("lock");
            let c = seen.entry(key.clone()).or_default();
            *c += 1;
            *c - 1
        };
        self.actions
            .lock()
            .expect("lock")
            .get(key)
            .and_then(|v| v.get(n).cloned())
            .unwrap_or(Action::Accept)
    }
}

/// One command the hop read and what it did.
#[derive(Debug, Clone)]
pub struct Event {
    /// The connection's transaction when the command arrived.
    pub txn: String,
    pub command: String,
    /// The reply line, or `<drop>`, `<stall>`, `<ignored>` (after a stall or a close).
    pub reply: String,
}

/// One connection as the hop saw it.
#[derive(Debug, Clone, Default)]
pub struct ConnRecord {
    pub id: usize,
    pub events: Vec<Event>,
}

/// A message the hop accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub txn: String,
    pub hop: String,
    pub conn: usize,
    /// The recipients accepted on that connection since `MAIL`, in order.
    pub rcpts: Vec<String>,
}

#[derive(Default)]
struct State {
    conns: Vec<ConnRecord>,
    deliveries: Vec<Delivery>,
}

/// A running scripted hop; stops when dropped.
pub struct ScriptedHop {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedHop {
    /// Listens on `addr` (port 0: any free port) as hop `name`.
    pub fn start(addr: SocketAddr, name: &str, script: Arc<Script>) -> ScriptedHop {
        let std_listener = std::net::TcpListener::bind(addr).expect("bind scripted hop");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("hop addr");
        let state: Arc<Mutex<State>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (st, nm) = (state.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("hop runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let id = {
                            let mut s = st.lock().expect("lock");
                            let id = s.conns.len();
                            s.conns.push(ConnRecord {
                                id,
                                events: Vec::new(),
                            });
                            id
                        };
                        let conn = HopConn {
                            id,
                            name: nm.clone(),
                            script: script.clone(),
                            state: st.clone(),
                        };
                        tokio::spawn(async move {
                            let _ = conn.serve(sock).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        ScriptedHop {
            addr,
            name: name.to_string(),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `[ip]:port`, as a smart host entry.
    pub fn smart_host(&self) -> String {
        format!("[{}]:{}", self.addr.ip(), self.addr.port())
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().expect("lock").deliveries.clone()
    }

    pub fn connections(&self) -> Vec<ConnRecord> {
        self.state.lock().expect("lock").conns.clone()
    }

    /// Every `RCPT TO` address the hop was sent, whatever it answered.
    pub fn rcpts_seen(&self) -> Vec<String> {
        let s = self.state.lock().expect("lock");
        s.conns
            .iter()
            .flat_map(|c| c.events.iter())
            .filter_map(|e| rcpt_of(&e.command))
            .collect()
    }

    /// The connections that carried transaction `txn`, as readable lines (failure messages).
    pub fn transcript_for(&self, txn: &str) -> Vec<String> {
        let s = self.state.lock().expect("lock");
        let mut out = Vec::new();
        for c in &s.conns {
            if c.events.iter().any(|e| e.txn == txn) {
                out.push(format!("  {} conn #{}:", self.name, c.id));
                for e in &c.events {
                    out.push(format!("    [{}] C: {}  S: {}", e.txn, e.command, e.reply));
                }
            }
        }
        out
    }
}

impl Drop for ScriptedHop {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `RCPT TO:<a@b>` → `a@b`.
pub fn rcpt_of(command: &str) -> Option<String> {
    let upper = command.to_ascii_uppercase();
    upper.starts_with("RCPT TO:").then(|| angle(&command[8..]))
}

/// `<a@b> SIZE=1` → `a@b`.
fn angle(s: &str) -> String {
    let s = s.trim();
    match (s.find('<'), s.find('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].to_string(),
        _ => s.split_whitespace().next().unwrap_or("").to_string(),
    }
}

struct HopConn {
    id: usize,
    name: String,
    script: Arc<Script>,
    state: Arc<Mutex<State>>,
}

/// What to do after an event.
enum Then {
    Continue,
    Close,
    Stall,
}

impl HopConn {
    fn record(&self, txn: &str, command: &str, reply: &str) {
        let mut s = self.state.lock().expect("lock");
        if let Some(c) = s.conns.get_mut(self.id) {
            c.events.push(Event {
                txn: txn.to_string(),
                command: command.to_string(),
                reply: reply.to_string(),
            });
        }
    }

    /// Applies the script to a command whose positive reply is `ok`; returns the reply line
    /// (if any), whether it is positive, and what to do next.
    fn act(&self, txn: &str, kind: Kind, rcpt: &str, ok: &str) -> (Option<String>, bool, Then) {
        let action = self.script.next(&Key::new(txn, &self.name, kind, rcpt));
        match action {
            Action::Accept => (Some(ok.to_string()), true, Then::Continue),
            Action::AcceptThenClose => (Some(ok.to_string()), true, Then::Close),
            Action::Reply(r) => {
                let positive = r.starts_with('2') || (kind == Kind::Data && r.starts_with("354"));
                (Some(r), positive, Then::Continue)
            }
            Action::Drop => (None, false, Then::Close),
            Action::Stall => (None, false, Then::Stall),
        }
    }

    async fn serve(self, sock: tokio::net::TcpStream) -> std::io::Result<()> {
        let _ = sock.set_nodelay(true);
        let mut r = BufReader::new(sock);
        r.get_mut()
            .write_all(format!("220 {}.hop.test ESMTP scripted\r\n", self.name).as_bytes())
            .await?;
        let mut txn = String::new();
        let mut rcpts: Vec<String> = Vec::new();
        let mut then = Then::Continue;
        loop {
            if !matches!(then, Then::Continue) {
                break;
            }
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let upper = text.to_ascii_uppercase();
            let (reply, next): (Option<String>, Then) = if upper.starts_with("EHLO")
                || upper.starts_with("HELO")
            {
                txn.clear();
                rcpts.clear();
                (
                    Some(format!(
                        "250-{}.hop.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES",
                        self.name
                    )),
                    Then::Continue,
                )
            } else if upper.starts_with("MAIL FROM:") {
                let from = angle(&text[10..]);
                let local = from.split('@').next().unwrap_or("").to_string();
                let (reply, positive, next) = self.act(&local, Kind::Mail, "", "250 2.1.0 Ok");
                rcpts.clear();
                // Recorded under the transaction MAIL named, whatever the answer.
                self.record(&local, &text, &shown(&reply, &next));
                txn = if positive { local } else { String::new() };
                if let Some(rep) = &reply {
                    write_reply(&mut r, rep).await?;
                }
                then = next;
                continue;
            } else if upper.starts_with("RCPT TO:") {
                let rcpt = angle(&text[8..]);
                if txn.is_empty() {
                    (Some("503 5.5.1 need MAIL first".into()), Then::Continue)
                } else {
                    let (reply, positive, next) = self.act(&txn, Kind::Rcpt, &rcpt, "250 2.1.5 Ok");
                    if positive {
                        rcpts.push(rcpt);
                    }
                    (reply, next)
                }
            } else if upper == "DATA" {
                if txn.is_empty() || rcpts.is_empty() {
                    (Some("503 5.5.1 no valid recipients".into()), Then::Continue)
                } else {
                    let (reply, positive, next) =
                        self.act(&txn, Kind::Data, "", "354 End data with <CR><LF>.<CR><LF>");
                    let streaming =
                        positive && reply.as_deref().is_some_and(|r| r.starts_with("354"));
                    self.record(&txn, &text, &shown(&reply, &next));
                    if let Some(rep) = &reply {
                        write_reply(&mut r, rep).await?;
                    }
                    then = next;
                    if !streaming || !matches!(then, Then::Continue) {
                        continue;
                    }
                    // The body: the script may drop the connection at its first line.
                    let mut lines = 0usize;
                    let mut dropped = false;
                    loop {
                        let mut l = Vec::new();
                        if r.read_until(b'\n', &mut l).await? == 0 {
                            self.record(&txn, &format!("<EOF after {lines} body lines>"), "");
                            return Ok(());
                        }
                        if l == b".\r\n" {
                            break;
                        }
                        if lines == 0 {
                            let action =
                                self.script
                                    .next(&Key::new(&txn, &self.name, Kind::Body, ""));
                            if action == Action::Drop {
                                self.record(&txn, "<body line 1>", "<drop>");
                                dropped = true;
                                break;
                            }
                        }
                        lines += 1;
                    }
                    if dropped {
                        then = Then::Close;
                        continue;
                    }
                    let (reply, positive, next) =
                        self.act(&txn, Kind::Dot, "", "250 2.0.0 Ok: queued");
                    if positive {
                        self.state.lock().expect("lock").deliveries.push(Delivery {
                            txn: txn.clone(),
                            hop: self.name.clone(),
                            conn: self.id,
                            rcpts: rcpts.clone(),
                        });
                    }
                    self.record(
                        &txn,
                        &format!("<{lines} body lines> ."),
                        &shown(&reply, &next),
                    );
                    if reply.is_some() {
                        // A received final reply ends the SMTP transaction.
                        txn.clear();
                        rcpts.clear();
                    }
                    if let Some(rep) = &reply {
                        write_reply(&mut r, rep).await?;
                    }
                    then = next;
                    continue;
                }
            } else if upper == "RSET" {
                let (reply, _, next) = self.act(&txn, Kind::Rset, "", "250 2.0.0 Ok");
                self.record(&txn, &text, &shown(&reply, &next));
                txn.clear();
                rcpts.clear();
                if let Some(rep) = &reply {
                    write_reply(&mut r, rep).await?;
                }
                then = next;
                continue;
            } else if upper == "NOOP" {
                (Some("250 2.0.0 Ok".into()), Then::Continue)
            } else if upper == "QUIT" {
                self.record(&txn, &text, "221 2.0.0 Bye");
                write_reply(&mut r, "221 2.0.0 Bye").await?;
                let _ = r.get_mut().shutdown().await;
                return Ok(());
            } else {
                (
                    Some("502 5.5.2 command not recognized".into()),
                    Then::Continue,
                )
            };
            self.record(&txn, &text, &shown(&reply, &next));
            if let Some(rep) = &reply {
                write_reply(&mut r, rep).await?;
            }
            then = next;
        }
        // Closed or stalled: record what still arrives, answer nothing, end at the peer's
        // close (guard: 60 s, so a peer that never closes does not keep the task forever).
        if matches!(then, Then::Close) {
            let _ = r.get_mut().shutdown().await;
        }
        let rest = async {
            loop {
                let mut l = Vec::new();
                match r.read_until(b'\n', &mut l).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let t = String::from_utf8_lossy(&l).trim_end().to_string();
                        self.record(&txn, &t, "<ignored>");
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(60), rest).await;
        Ok(())
    }
}

/// The reply as recorded: the line, with what the hop did after it.
fn shown(reply: &Option<String>, next: &Then) -> String {
    match (reply, next) {
        (Some(r), Then::Close) => format!("{r} <then closed>"),
        (Some(r), _) => r.replace("\r\n", " | "),
        (None, Then::Close) => "<drop>".into(),
        (None, Then::Stall) => "<stall>".into(),
        (None, Then::Continue) => "".into(),
    }
}

async fn write_reply(r: &mut BufReader<tokio::net::TcpStream>, reply: &str) -> std::io::Result<()> {
    r.get_mut().write_all(reply.as_bytes()).await?;
    r.get_mut().write_all(b"\r\n").await?;
    r.get_mut().flush().await
}
