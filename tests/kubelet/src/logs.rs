//! Container log files in the CRI format, and the reader behind `kubectl logs`.
//!
//! `<state-dir>/pods/<ns>_<name>/<container>.log` holds, per process start, one header line
//! `=== process-kubelet <time> start #<n>: …` followed by records
//! `<RFC 3339 time> <stdout|stderr> <F|P> <bytes>\n` — what a CRI runtime writes under
//! /var/log/pods: `F` ends a line, `P` is a piece of a line continued by the next record of the
//! same stream (a write without a trailing newline, or a line longer than one read). The kubelet
//! copies each process's stdout and stderr through pipes so every line gets the time it was
//! read; that is what makes `timestamps`, `sinceSeconds` and `sinceTime` answerable.
//!
//! Invariants: each record is written with one `write_all` under a mutex shared by the two
//! streams, so records never interleave; a header line never starts with a digit, so it cannot
//! be mistaken for a record; a reader never returns a half record (it stops at the last `\n`).

use std::fs::File;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tracing::warn;

/// Prefix of the line the kubelet writes before each process start.
pub const HEADER_PREFIX: &str = "=== process-kubelet ";

/// Largest piece copied into one record; longer lines become several `P` records.
const CHUNK: usize = 16 * 1024;

/// Copies one output stream of a process into the log file as CRI records until EOF.
pub async fn copy_stream<R: AsyncRead + Unpin>(
    mut from: R,
    stream: &'static str,
    file: Arc<Mutex<File>>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                warn!(stream, error = %e, "reading container output failed");
                return;
            }
        };
        let mut out = Vec::with_capacity(n + 64);
        let now = Timestamp::now();
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (piece, tag, next) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], "F", &rest[i + 1..]),
                None => (rest, "P", &rest[rest.len()..]),
            };
            out.extend_from_slice(format!("{now} {stream} {tag} ").as_bytes());
            out.extend_from_slice(piece);
            out.push(b'\n');
            rest = next;
        }
        let Ok(mut f) = file.lock() else { return };
        if let Err(e) = f.write_all(&out) {
            warn!(stream, error = %e, "writing container log failed");
            return;
        }
    }
}

/// One record of a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A process start: the records after it belong to a new container instance.
    Start,
    Record {
        time: Timestamp,
        stream: Stream,
        /// `true` for `F`: the record ends a line.
        full: bool,
        content: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Parses one line of a log file (without its `\n`). Unknown lines yield `None`.
pub fn parse_line(line: &[u8]) -> Option<Entry> {
    if line.starts_with(HEADER_PREFIX.as_bytes()) {
        return Some(Entry::Start);
    }
    let mut parts = line.splitn(4, |&b| b == b' ');
    let time: Timestamp = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let full = match parts.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    let content = parts.next().unwrap_or_default().to_vec();
    Some(Entry::Record {
        time,
        stream,
        full,
        content,
    })
}

/// The query of `GET /containerLogs/…` that the reader honours.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Only lines whose first record was read at or after this time.
    pub since: Option<Timestamp>,
    /// Only this stream (`stream=Stdout|Stderr`); `None` = both.
    pub stream: Option<Stream>,
}

/// A log line reassembled from its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub time: Timestamp,
    pub stream: Stream,
    pub content: Vec<u8>,
    /// `false` while the line's last record was a `P` (the process has not ended it yet).
    pub complete: bool,
}

/// Reassembles lines, one container instance at a time. `P` records are joined per stream.
#[derive(Debug, Default)]
pub struct Assembler {
    /// Finished instances (for `previous`) are kept only as the last one.
    pub previous: Vec<Line>,
    pub current: Vec<Line>,
    /// Index in `current` of the open (partial) line of each stream.
    open: [Option<usize>; 2],
    /// Number of `Start` entries seen.
    pub starts: usize,
}

impl Assembler {
    pub fn push(&mut self, e: Entry) {
        match e {
            Entry::Start => {
                self.starts += 1;
                self.previous = std::mem::take(&mut self.current);
                self.open = [None, None];
            }
            Entry::Record {
                time,
                stream,
                full,
                content,
            } => {
                let slot = stream as usize;
                match self.open[slot] {
                    Some(i) => {
                        let l = &mut self.current[i];
                        l.content.extend_from_slice(&content);
                        l.complete = full;
                    }
                    None => self.current.push(Line {
                        time,
                        stream,
                        content,
                        complete: full,
                    }),
                }
                self.open[slot] = if full {
                    None
                } else {
                    Some(self.open[slot].unwrap_or(self.current.len() - 1))
                };
            }
        }
    }

    /// Feeds every complete line of `data`; returns how many bytes were consumed (up to and
    /// including the last `\n`).
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let Some(end) = data.iter().rposition(|&b| b == b'\n') else {
            return 0;
        };
        for line in data[..end].split(|&b| b == b'\n') {
            if let Some(e) = parse_line(line) {
                self.push(e);
            }
        }
        end + 1
    }
}

/// Formats one line as `kubectl logs` prints it.
pub fn format_line(l: &Line, timestamps: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(l.content.len() + 40);
    if timestamps {
        out.extend_from_slice(format!("{} ", rfc3339_nano(l.time)).as_bytes());
    }
    out.extend_from_slice(&l.content);
    out.push(b'\n');
    out
}

/// Go's RFC3339Nano (`2006-01-02T15:04:05.999999999Z`): trailing zeros of the fraction dropped.
fn rfc3339_nano(t: Timestamp) -> String {
    t.to_string()
}

/// Selects the lines of one instance that `q` asks for (since, stream, tailLines), complete
/// lines only unless `with_partial`.
pub fn select<'a>(lines: &'a [Line], q: &Query, with_partial: bool) -> Vec<&'a Line> {
    let mut v: Vec<&Line> = lines
        .iter()
        .filter(|l| with_partial || l.complete)
        .filter(|l| q.since.is_none_or(|s| l.time >= s))
        .filter(|l| q.stream.is_none_or(|s| l.stream == s))
        .collect();
    if let Some(n) = q.tail_lines {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if v.len() > n {
            v.drain(..v.len() - n);
        }
    }
    v
}

/// Reads an open log file to its end, returning the assembled lines and the bytes after the
/// last `\n` (a record still being written), which a follower feeds again with what comes next.
pub fn read_to_end(f: &mut impl std::io::Read) -> std::io::Result<(Assembler, Vec<u8>)> {
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    let mut a = Assembler::default();
    let used = a.feed(&data);
    Ok((a, data.split_off(used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Assembler {
        let mut a = Assembler::default();
        a.feed(text.as_bytes());
        a
    }

    const LOG: &str = "=== process-kubelet 2026-12-01T10:00:00Z start #0: /bin/x [] (pod IP 1)\n\
        2026-12-01T10:00:01Z stdout F one\n\
        2026-12-01T10:00:02Z stderr F two\n\
        === process-kubelet 2026-12-01T10:01:00Z start #1: /bin/x [] (pod IP 1)\n\
        2026-12-01T10:01:01Z stdout P thr\n\
        2026-12-01T10:01:02Z stderr F four\n\
        2026-12-01T10:01:03Z stdout F ee\n\
        2026-12-01T10:01:04.5Z stdout F five with spaces\n\
        2026-12-01T10:01:05Z stdout P six-unfinished\n";

    fn texts(v: &[&Line]) -> Vec<String> {
        v.iter()
            .map(|l| String::from_utf8_lossy(&l.content).into_owned())
            .collect()
    }

    #[test]
    fn instances_and_partial_records() {
        let a = file(LOG);
        assert_eq!(a.starts, 2);
        let q = Query::default();
        assert_eq!(texts(&select(&a.previous, &q, false)), ["one", "two"]);
        // "thr" + "ee" are one stdout line, interleaved with a stderr line; its time is the
        // first piece's.
        let cur = select(&a.current, &q, false);
        assert_eq!(texts(&cur), ["three", "four", "five with spaces"]);
        assert_eq!(cur[0].time.to_string(), "2026-12-01T10:01:01Z");
        assert_eq!(
            texts(&select(&a.current, &q, true)),
            ["three", "four", "five with spaces", "six-unfinished"]
        );
    }

    #[test]
    fn tail_since_stream_and_timestamps() {
        let a = file(LOG);
        let q = Query {
            tail_lines: Some(2),
            ..Default::default()
        };
        assert_eq!(
            texts(&select(&a.current, &q, false)),
            ["four", "five with spaces"]
        );
        let q = Query {
            tail_lines: Some(0),
            ..Default::default()
        };
        assert!(select(&a.current, &q, false).is_empty());
        let q = Query {
            since: Some("2026-12-01T10:01:02Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            texts(&select(&a.current, &q, false)),
            ["four", "five with spaces"]
        );
        let q = Query {
            stream: Some(Stream::Stderr),
            ..Default::default()
        };
        assert_eq!(texts(&select(&a.current, &q, false)), ["four"]);
        let five = select(&a.current, &Query::default(), false)[2];
        assert_eq!(
            String::from_utf8(format_line(five, true)).unwrap(),
            "2026-12-01T10:01:04.5Z five with spaces\n"
        );
        assert_eq!(
            String::from_utf8(format_line(five, false)).unwrap(),
            "five with spaces\n"
        );
    }

    #[test]
    fn feed_stops_at_the_last_newline() {
        let mut a = Assembler::default();
        let text = "2026-12-01T10:00:01Z stdout F one\n2026-12-01T10:00:02Z std";
        assert_eq!(a.feed(text.as_bytes()), 34);
        assert_eq!(a.current.len(), 1);
        assert_eq!(a.feed(b"no newline"), 0);
    }

    #[tokio::test]
    async fn copy_stream_writes_records() {
        let dir = std::env::temp_dir().join(format!("pg-kubelet-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.log");
        let f = Arc::new(Mutex::new(File::create(&path).unwrap()));
        let input: &[u8] = b"alpha\nbeta\ngam";
        copy_stream(input, "stderr", f).await;
        let (a, rest) = read_to_end(&mut File::open(&path).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(rest.is_empty());
        let lines = select(&a.current, &Query::default(), true);
        assert_eq!(texts(&lines), ["alpha", "beta", "gam"]);
        assert!(lines.iter().all(|l| l.stream == Stream::Stderr));
        assert!(!lines[2].complete);
    }
}
