//! Reading command lines and writing replies. Replies are batched and flushed only when no
//! complete command is buffered (RFC 2920). Every read has the command (or DATA) timeout and
//! every write the command timeout: a client that stops reading cannot hold its slot past it.
//!
//! Reads go straight into the session's buffer (no zeroed scratch array, no copy). Its spare
//! room starts at [`MIN_READ`] and doubles whenever a read fills it, up to [`MAX_READ`]: a
//! session that sends messages reads them in a few large reads. Between transactions, a read
//! that has to wait gives the empty read and reply buffers back: an idle session holds none.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout;

use super::Session;
use crate::admission::Interrupt;

/// How long a graceful close (TLS close_notify, FIN) may take after the last reply.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// Spare room the read buffer always offers a read.
const MIN_READ: usize = 1024;
/// The buffer stops doubling its room here: a TLS record's worth (16 KiB) per read.
const MAX_READ: usize = 16 * 1024;

pub(super) enum ReadError {
    Timeout,
    Shutdown,
    /// The listener gave this session's slot to a new client (admission).
    Shed,
    Closed,
}

async fn wait_deadline(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn write_deadline(&self) -> Duration {
        Duration::from_secs(self.rt.fleet.timeouts.command_secs)
    }

    /// Writes the batched replies; a client that does not take them within the command
    /// timeout gets an error (and the session closes).
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let deadline = self.write_deadline();
        let write = async {
            self.conn.write_all(&self.out).await?;
            self.conn.flush().await
        };
        let res = match timeout(deadline, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client did not read its replies",
            )),
        };
        self.out.clear();
        res
    }

    /// Flushes what is left and closes the client connection. A client that did not take the
    /// flush gets no graceful shutdown (TLS close_notify would wait on the same full window);
    /// the socket is just dropped.
    pub(super) async fn close(&mut self) {
        if self.flush().await.is_ok() {
            let _ = timeout(SHUTDOWN_DEADLINE, self.conn.shutdown()).await;
        }
    }

    /// Reads more bytes into the buffer, honouring the timeout and the shutdown deadline.
    pub(super) async fn fill(&mut self, secs: u64) -> Result<(), ReadError> {
        self.fill_as(secs, false).await
    }

    /// [`Session::fill`]; with `release`, a read that has to wait gives back the (empty) read
    /// and reply buffers until bytes arrive: a session waiting for its next transaction holds
    /// no buffer of its own. The read buffer comes back with the room it had, so a session
    /// that sends messages keeps reading them in large reads.
    async fn fill_as(&mut self, secs: u64, release: bool) -> Result<(), ReadError> {
        if self.rpos > 0 && self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > 64 * 1024 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        // A scratch array here would live in every session's task (16 KiB, zeroed on each
        // read, then copied): the profile's memset/memmove, and most of an idle session's RSS.
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ {
            self.rbuf.reserve(MIN_READ);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let release = release && self.rbuf.is_empty() && self.out.is_empty();
        let mut deadline = self.ctx.deadline.clone();
        let interrupted = self.ctx.admission.interrupted();
        let (conn, rbuf, out) = (&mut self.conn, &mut self.rbuf, &mut self.out);
        let read = std::future::poll_fn(|cx| {
            if rbuf.capacity() == 0 {
                rbuf.reserve(room);
            }
            let r = std::pin::pin!(conn.read_buf(&mut *rbuf)).poll(cx);
            if release && r.is_pending() {
                *rbuf = Vec::new();
                *out = Vec::new();
            }
            r
        });
        let read = timeout(Duration::from_secs(secs), read);
        tokio::select! {
            r = read => match r {
                Ok(Ok(0)) | Ok(Err(_)) => Err(ReadError::Closed),
                Ok(Ok(n)) => {
                    if n == room && self.rbuf.capacity() < MAX_READ {
                        self.rbuf.reserve(self.rbuf.capacity());
                    }
                    Ok(())
                }
                Err(_) => Err(ReadError::Timeout),
            },
            _ = wait_deadline(&mut deadline) => Err(ReadError::Shutdown),
            i = interrupted => Err(match i {
                Interrupt::Shed => ReadError::Shed,
                Interrupt::StressTimeout => ReadError::Timeout,
            }),
        }
    }

    /// The next command line (with its LF), `Ok(None)` for an over-long line. Replies are
    /// flushed only when no complete command is buffered: RFC 2920 batching.
    pub(super) async fn next_command(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        let limit = self.rt.fleet.limits.max_command_line;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line = pending[..=i].to_vec();
                self.rpos += i + 1;
                if std::mem::take(&mut self.skipping_line) {
                    continue;
                }
                if line.len() > limit {
                    return Ok(None);
                }
                return Ok(Some(line));
            }
            if pending.len() > limit {
                self.rpos = self.rbuf.len();
                if !self.skipping_line {
                    self.skipping_line = true;
                    return Ok(None);
                }
            }
            if self.flush().await.is_err() {
                return Err(ReadError::Closed);
            }
            // Between transactions a session is sheddable again, and waits before MAIL FROM
            // are shorter under stress (admission).
            if self.tx.is_none() {
                self.ctx.admission.idle();
            }
            let configured = Duration::from_secs(self.rt.fleet.timeouts.command_secs);
            let secs = self.ctx.admission.command_timeout(configured).as_secs();
            self.fill_as(secs, self.tx.is_none()).await?;
        }
    }
}
