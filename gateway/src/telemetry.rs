//! JSON logs. Every SMTP decision is one `info` event with target `decision`; fields name the
//! connector, rule, client IP, TLS version and certificate subject. Message content, keys and
//! client-supplied header values are never logged.
//!
//! Lines go to stderr through a non-blocking writer: a session formats its line and hands it to
//! a bounded queue drained by one thread, so it never takes stderr's lock nor makes the write
//! syscall itself (16 % of the gateway's CPU in the issue 17 profile). Invariants:
//! - a session never waits for the log: when the queue is full (stderr's reader is slower than
//!   the mail) the line is dropped and counted ([`dropped_lines`], exposed as
//!   `partnergate_log_lines_dropped_total`);
//! - [`LogGuard`] lives as long as the process serves; dropping it drains the queue to stderr
//!   (bounded by tracing-appender: about a second), so the lines of the last messages before a
//!   SIGTERM are written before the process exits;
//! - the writer thread writes in batches (one `write` per batch, a 1 ms rest between batches).

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the queue holds before new ones are dropped; see docs/operations.md ("Logs").
pub const DEFAULT_BUFFER_LINES: usize = 32 * 1024;

/// Overrides [`DEFAULT_BUFFER_LINES`] (whole number from 1 to [`MAX_BUFFER_LINES`]).
pub const BUFFER_LINES_ENV: &str = "PARTNERGATE_LOG_BUFFER_LINES";

/// The queue's slots are allocated up front (about 32 bytes each, the lines themselves only
/// while queued): 1 Mi lines is 32 MiB before the first line, and a larger value is refused
/// at start rather than taking the node's memory (or panicking in the channel).
pub const MAX_BUFFER_LINES: usize = 1024 * 1024;

/// The writer thread flushes stderr after each batch it drains, so under load many lines share
/// one write syscall and an idle gateway's line is written at once.
const WRITE_BUFFER: usize = 64 * 1024;

/// How long the writer thread rests after each batch (see [`Batched`]).
const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// stderr as the writer thread sees it: buffered, and after each flush (the end of a batch) the
/// thread rests for [`BATCH_PAUSE`]. Without the rest it drained the queue line by line under
/// load: every line woke it (a futex wake from the session and a context switch), which cost
/// more than the synchronous write it replaced. Resting, it finds the lines of the last
/// millisecond waiting and writes them at once; sessions find it busy and need not wake it. A
/// line waits at most about that millisecond longer.
struct Batched<W: Write> {
    out: std::io::BufWriter<W>,
}

impl<W: Write> Write for Batched<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.out.flush();
        std::thread::sleep(BATCH_PAUSE);
        r
    }
}

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because the queue was full (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

/// Keeps the log writer thread; drop it last (it drains the queue to stderr).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// The lossy queue in front of `out`: `lines` lines at most, the rest dropped and counted.
fn non_blocking<W: Write + Send + 'static>(out: W, lines: usize) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines)
        .thread_name("partnergate-log")
        .finish(out)
}

fn buffer_lines() -> Result<usize, String> {
    parse_buffer_lines(std::env::var_os(BUFFER_LINES_ENV))
}

fn parse_buffer_lines(value: Option<std::ffi::OsString>) -> Result<usize, String> {
    match value {
        None => Ok(DEFAULT_BUFFER_LINES),
        Some(v) => match v.to_str().map(str::parse::<usize>) {
            Some(Ok(n)) if (1..=MAX_BUFFER_LINES).contains(&n) => Ok(n),
            _ => Err(format!(
                "{BUFFER_LINES_ENV}: expected a whole number from 1 to {MAX_BUFFER_LINES}, got {v:?}"
            )),
        },
    }
}

/// Installs the JSON subscriber on the non-blocking stderr writer. An invalid
/// [`BUFFER_LINES_ENV`] is an error (the caller exits); nothing is logged then.
pub fn init() -> Result<LogGuard, String> {
    let lines = buffer_lines()?;
    let filter =
        EnvFilter::try_from_env("PARTNERGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let out = Batched {
        out: std::io::BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()),
    };
    let (writer, worker) = non_blocking(out, lines);
    let counter = writer.error_counter();
    let installed = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init()
        .is_ok();
    if !installed {
        // Another subscriber is in place (tests): the writer would receive nothing.
        return Ok(LogGuard { _worker: None });
    }
    let _ = DROPPED.set(counter);
    Ok(LogGuard {
        _worker: Some(worker),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn buffer_lines_are_bounded_both_ways() {
        let parse = |v: &str| super::parse_buffer_lines(Some(v.into()));
        assert_eq!(
            super::parse_buffer_lines(None),
            Ok(super::DEFAULT_BUFFER_LINES)
        );
        assert_eq!(parse("1"), Ok(1));
        assert_eq!(parse("1048576"), Ok(super::MAX_BUFFER_LINES));
        // Over the bound: refused by name, not a 32 GB allocation or a panic in the channel.
        for bad in [
            "0",
            "1048577",
            "1000000000",
            "18446744073709551615",
            "-1",
            "1e3",
            "",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("PARTNERGATE_LOG_BUFFER_LINES"), "{e}");
        }
    }
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    /// A log reader that has stopped: the first write reports itself, then waits until released.
    struct Stalled {
        entered: mpsc::Sender<()>,
        release: Arc<Mutex<mpsc::Receiver<()>>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.lock().unwrap().recv();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_blocking() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let out = Stalled {
            entered: entered_tx,
            release: Arc::new(Mutex::new(release_rx)),
            got: got.clone(),
        };
        let (mut w, guard) = super::non_blocking(out, 4);
        let counter = w.error_counter();
        w.write_all(b"line 0\n").unwrap();
        // The writer thread holds line 0 and is stuck in the stalled reader.
        entered.recv().unwrap();
        for i in 1..=10 {
            // Returns at once: never blocks the caller.
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert_eq!(counter.dropped_lines(), 6, "4 queued, 6 dropped");
        for _ in 0..20 {
            let _ = release.send(());
        }
        drop(guard);
        assert_eq!(
            String::from_utf8(got.lock().unwrap().clone()).unwrap(),
            "line 0\nline 1\nline 2\nline 3\nline 4\n",
            "the queued lines are written, in order, when the guard drains the queue"
        );
    }
}
