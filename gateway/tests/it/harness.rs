//! Checks of the test harness itself, without the gateway: the recording sink driven by each
//! real client, and the private Postfix instance relaying to the sink with TLS verification.
//! When a gateway test fails, these show whether the peers and the harness work.

use crate::support::peers::{Openssl, Python, Swaks};
use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::sink::{Sink, SinkOptions};
use crate::support::smtp::message;
use crate::support::{Net, Pki};

#[test]
fn swaks_delivers_to_the_recording_sink() {
    let net = Net::new();
    let sink = Sink::start(net.sink_ip());
    let t = Swaks::new(sink.addr)
        .local(net.client(0))
        .from("alice@contoso.com")
        .to("bob@example.org")
        .header("X-Test: 1")
        .run();
    t.assert_delivered("swaks → sink");
    let m = sink.wait_messages(1);
    assert_eq!(m[0].mail_from, "alice@contoso.com");
    assert_eq!(m[0].rcpt_to, ["bob@example.org"]);
    assert_eq!(m[0].header_values("X-Test"), ["1"]);
}

#[test]
fn openssl_and_python_talk_starttls_to_the_sink() {
    let net = Net::new();
    let pki = Pki::generate();
    let sink = Sink::start_with(
        net.sink_ip(),
        SinkOptions {
            starttls: Some(pki.sink.clone()),
            rcpt_reply: None,
            reject_rcpt: vec![("nobody@example.org".into(), "550 5.1.1 no such user".into())],
            data_reply: None,
            requiretls: false,
        },
    );
    // openssl verifies the name gateway.test; the sink's certificate says sink.test, so
    // expect the handshake to fail: this checks that the wrapper does verify.
    let t = Openssl::new(sink.addr, &pki.ca).run(&["EHLO client.test"]);
    assert!(
        t.steps.is_empty(),
        "openssl must refuse a certificate for another name: {}",
        t.raw
    );

    let t = Openssl::new(sink.addr, &pki.ca)
        .server_name("sink.test")
        .tls_version("1.2")
        .run(&[
            "EHLO client.test",
            "MAIL FROM:<alice@contoso.com>",
            "RCPT TO:<bob@example.org>",
            "DATA",
            "Subject: openssl\n\nhello\n.",
            "QUIT",
        ]);
    t.assert_delivered("openssl → sink");

    let t = Python::new(sink.addr).local(net.client(1)).send(
        "alice@contoso.com",
        &["bob@example.org", "nobody@example.org"],
        &message("alice@contoso.com", "bob@example.org", "py", &[]),
    );
    t.assert_refused("550 5.1.1", "python → sink, second recipient");
    assert_eq!(t.data_end().map(|r| r.code), Some(250), "{}", t.raw);
    let m = sink.wait_messages(2);
    assert!(m[0].tls, "openssl used STARTTLS");
    assert_eq!(m[1].rcpt_to, ["bob@example.org"]);
}

#[test]
fn postfix_relays_to_sink_with_verified_tls() {
    let net = Net::new();
    let pki = Pki::generate();
    let sink = Sink::start_with(
        net.sink_ip(),
        SinkOptions {
            starttls: Some(pki.sink.clone()),
            ..SinkOptions::default()
        },
    );
    let mut opts = PostfixOptions::new(net.ip(30), sink.addr);
    opts.tls_level = "verify".into();
    opts.verify_name = "sink.test".into();
    opts.ca_file = Some(pki.ca.clone());
    opts.client_cert = Some(pki.contoso_client.clone());
    let pf = Postfix::start(opts);
    let id = pf.submit(
        "alice@contoso.com",
        "bob@example.org",
        &message("alice@contoso.com", "bob@example.org", "postfix", &[]),
    );
    let d = pf.wait_delivery(&id, "bob@example.org");
    assert_eq!(d.status, "sent", "{}", d.line);
    assert!(d.detail.starts_with("250 2.0.0"), "{}", d.line);
    let m = sink.wait_messages(1);
    assert!(m[0].tls, "postfix used STARTTLS to the sink");
    assert!(
        pf.maillog().contains("Verified TLS connection established"),
        "{}",
        pf.maillog()
    );
}
