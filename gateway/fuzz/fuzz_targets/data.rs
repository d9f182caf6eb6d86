//! The DATA path: arbitrary bytes, cut into reads of arbitrary sizes, go through the same line
//! splitting as the session (`partnergate_gateway::data::DataFilter`, with `push_fragment` for
//! an over-long partial line). Properties checked on what would be forwarded to the next hop:
//!
//! 1. nothing forwarded is (or, joined, contains) an end-of-data `<CRLF>.<CRLF>`: the next hop
//!    can never see the message end before the gateway's own terminator (SMTP smuggling);
//! 2. when the message is accepted, every forwarded line ends in CRLF with no other CR or LF;
//! 3. the end is found exactly at the first `<CRLF>.<CRLF>` of the input (counting the CRLF
//!    that ended the DATA command);
//! 4. the forwarded header section, read as the next hop reads it (one leading dot removed,
//!    folded lines joined), has no `X-Partnergate-Connector` header and does not start with a
//!    continuation line (which would fold into the gateway's own header);
//! 5. an accepted message respects the size and line limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use partnergate_gateway::data::{Action, DataFilter};

const MAX_SIZE: u64 = 4096;
const MAX_LINE: usize = 1000;

fuzz_target!(|input: &[u8]| {
    // The first two bytes choose the read sizes; the rest is the client's data.
    if input.len() < 2 {
        return;
    }
    let (a, b) = (input[0] as usize % 97 + 1, input[1] as usize % 3001 + 1);
    let data = &input[2..];
    let mut f = DataFilter::new(MAX_SIZE, MAX_LINE);
    let mut forwarded: Vec<u8> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut consumed = 0usize; // bytes of `data` taken into `buf`
    let mut pos = 0usize; // bytes of `data` handled by the filter
    let mut end_at: Option<usize> = None;
    let mut turn = 0usize;
    'outer: loop {
        // Same loop shape as Session::data: whole lines first, then an over-long fragment.
        while let Some(i) = buf.iter().position(|c| *c == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            pos += line.len();
            match f.push_line(&line) {
                Action::Forward => forwarded.extend_from_slice(&line),
                Action::Drop => {}
                Action::End => {
                    end_at = Some(pos);
                    break 'outer;
                }
            }
        }
        if buf.len() > MAX_LINE {
            // As the session does: a trailing CR stays buffered for its LF.
            let keep = usize::from(buf.ends_with(b"\r"));
            let frag: Vec<u8> = buf.drain(..buf.len() - keep).collect();
            pos += frag.len();
            f.push_fragment(&frag);
        }
        if consumed == data.len() {
            break;
        }
        let n = if turn % 2 == 0 { a } else { b }.min(data.len() - consumed);
        turn += 1;
        buf.extend_from_slice(&data[consumed..consumed + n]);
        consumed += n;
    }

    // 3. The terminator: DATA's own CRLF precedes the data.
    let mut wire = b"\r\n".to_vec();
    wire.extend_from_slice(data);
    let first_end = wire
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| i + 5 - 2);
    assert_eq!(end_at, first_end, "end of data at the wrong place");

    // 1. Our prepended headers end in CRLF, then the forwarded bytes, then our terminator.
    let mut stream = b"X: y\r\n".to_vec();
    stream.extend_from_slice(&forwarded);
    assert!(
        !stream.windows(5).any(|w| w == b"\r\n.\r\n"),
        "a forwarded line ends the data early"
    );

    if f.error.is_none() && end_at.is_some() {
        // 2. Clean lines.
        for line in forwarded.split_inclusive(|c| *c == b'\n') {
            assert!(line.ends_with(b"\r\n"), "forwarded line without CRLF");
            let body = &line[..line.len() - 2];
            assert!(
                !body.iter().any(|c| *c == b'\r' || *c == b'\n'),
                "bare CR/LF forwarded"
            );
            // 5. Limits.
            assert!(line.len() <= MAX_LINE, "over-long line forwarded");
        }
        let size = end_at.unwrap_or(0).saturating_sub(3) as u64;
        assert!(size <= MAX_SIZE, "oversized message accepted");
        // 4. The header section as the next hop reads it.
        let mut first = true;
        for line in forwarded.split_inclusive(|c| *c == b'\n') {
            let body = &line[..line.len() - 2];
            let logical = body.strip_prefix(b".").unwrap_or(body);
            if logical.is_empty() {
                break;
            }
            if first {
                assert!(
                    logical[0] != b' ' && logical[0] != b'\t',
                    "continuation line right after the gateway's headers"
                );
            }
            first = false;
            let name_end = logical.iter().position(|c| *c == b':');
            if let Some(e) = name_end {
                let mut name = &logical[..e];
                while let [rest @ .., b' ' | b'\t'] = name {
                    name = rest;
                }
                assert!(
                    !name.eq_ignore_ascii_case(b"x-partnergate-connector"),
                    "spoofed X-Partnergate-Connector forwarded"
                );
            }
        }
    }
});
