//! STARTTLS (RFC 3207): the handshake with the gateway's server certificate, a client
//! certificate asked for but never required (the connector rules decide), and the session
//! started over. Whatever the client pipelined after STARTTLS in plaintext is discarded
//! (CVE-2011-0411).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;

use super::{Decision, Flow, Session};
use crate::certs::PeerCert;
use crate::policy::TlsVersion;
use crate::reply::fixed;
use crate::stream::Conn;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The Inbound connector the client's certificate or IP identifies (claiming rules 1–2),
    /// for the per-partner handshake metric; `none` when neither does. Uses the claim index: a
    /// failed handshake must not cost a scan of every connector.
    fn identified_connector(&self) -> String {
        self.rt
            .connectors
            .claim(&self.facts(), None)
            .filter(|c| c.identify_by != crate::config::IdentifyBy::SenderDomain)
            .map_or_else(|| "none".to_string(), |c| c.name.clone())
    }

    pub(super) async fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            return self.error(&fixed::ALREADY_TLS);
        }
        if self.helo.is_none() {
            return self.error(&fixed::HELO_FIRST);
        }
        // A transaction opened in plaintext does not survive into the TLS session.
        self.end_tx().await;
        self.reply(&fixed::READY_TLS);
        if self.flush().await.is_err() {
            return Flow::Close;
        }
        // CVE-2011-0411: whatever the client pipelined after STARTTLS was sent in plaintext and
        // must never be executed inside the TLS session.
        self.rbuf.clear();
        self.rpos = 0;
        self.skipping_line = false;
        let Conn::Plain(plain) = self.conn.take_inner() else {
            return Flow::Close;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.rt.server_tls.clone());
        let secs = Duration::from_secs(self.rt.fleet.timeouts.tls_handshake_secs);
        // Boxed: the handshake future holds a whole rustls connection; inline it would be part
        // of every session's task for its whole life. Once per session.
        let tls = match Box::pin(timeout(secs, acceptor.accept(plain))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.ctx.metrics.tls("unknown", "failure");
                let connector = self.identified_connector();
                self.ctx.metrics.connector_tls(&connector, "failure");
                let error = e.to_string();
                let d = Decision {
                    connector: &connector,
                    rule: "starttls",
                    outcome: "handshake_failed",
                    error: Some(&error),
                    ..Decision::default()
                };
                self.log_decision(d, "TLS handshake failed");
                return Flow::Close;
            }
            Err(_) => {
                self.ctx.metrics.tls("unknown", "timeout");
                let connector = self.identified_connector();
                self.ctx.metrics.connector_tls(&connector, "timeout");
                return Flow::Close;
            }
        };
        let (_, server) = tls.get_ref();
        let version = match server.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
            _ => return Flow::Close,
        };
        let chain: Option<Vec<_>> = server
            .peer_certificates()
            .filter(|c| !c.is_empty())
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect());
        self.cert = chain
            .and_then(|c| PeerCert::new(c, self.rt.trust.clone()))
            .map(Arc::new);
        self.ctx.metrics.tls(version.as_str(), "success");
        let connector = self.identified_connector();
        self.ctx.metrics.connector_tls(&connector, "success");
        self.tls = Some(version);
        self.conn = Conn::ServerTls(Box::new(tls));
        // RFC 3207: the session starts over; EHLO is required again.
        self.helo = None;
        self.esmtp = false;
        tracing::debug!(session = %self.id, tls = version.as_str(), cert_subject = %self.cert_subject(), "STARTTLS done");
        Flow::Continue
    }
}
