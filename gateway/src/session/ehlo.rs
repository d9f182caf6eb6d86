//! EHLO and HELO: end any open transaction, remember the client's name, list the extensions
//! (STARTTLS only while the session is plaintext, REQUIRETLS only once it is encrypted:
//! RFC 8689 4.1).

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Session};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn ehlo(&mut self, host: &str, esmtp: bool) -> Flow {
        self.end_tx().await;
        self.helo = Some(host.to_string());
        self.esmtp = esmtp;
        let f = &self.rt.fleet;
        if !esmtp {
            let r = format!("250 {}\r\n", f.hostname);
            self.out.extend_from_slice(r.as_bytes());
            return Flow::Continue;
        }
        let mut lines = vec![
            f.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", f.limits.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.tls.is_none() {
            lines.push("STARTTLS".into());
        } else {
            lines.push("REQUIRETLS".into());
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
        Flow::Continue
    }
}
