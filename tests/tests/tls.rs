//! TLS on every runtime, with certificates made by the tests: produce and fetch through the
//! broker, refused certificates, mTLS, a plaintext client on the TLS port, large fetches (no
//! `sendfile` through TLS), and the client certificate's subject reaching the handler.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use streambus_adapters::tls::rustls;
use streambus_adapters::{Handler, HandshakeFailure, Reply, ServeOptions};
use streambus_core::{Flags, HealthCheckResponse, Request, RequestType, Response, Text};
use streambus_server::{Running, RuntimeKind};
use streambus_tests::tls::{Pki, rustls_error};
use streambus_tests::{RUNTIMES, RawClient, broker_config, fetch, fetch_all, produce};

const KINDS: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

fn tls_broker(dir: &std::path::Path, rt: RuntimeKind, pki: &Pki, mtls: bool) -> Running {
    let mut c = broker_config(dir, rt);
    c.tls = Some(pki.broker_files(mtls));
    streambus_server::start(c).expect("broker starts")
}

/// Waits (up to 10 s) until the broker has counted `n` handshakes failed for `reason`.
fn wait_for_failures(b: &Running, reason: HandshakeFailure, n: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = b.metrics().tls_handshake_failures(reason);
        if seen == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {seen} handshakes failed with {reason}, want {n}"
        );
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn produce_and_fetch(c: &mut RawClient, topic: &str, what: &str) {
    let r = produce(c, topic, 0, &[b"one", b"two", b"three"]).unwrap();
    assert_eq!(r.error_code(), 0, "{what}");
    let got = fetch_all(c, topic, 0, 0).unwrap();
    assert_eq!(
        got,
        vec![
            (0, b"one".to_vec()),
            (1, b"two".to_vec()),
            (2, b"three".to_vec())
        ],
        "{what}"
    );
}

#[test]
fn a_tls_client_produces_and_fetches_on_every_runtime() {
    let pki = Pki::new();
    for rt in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let b = tls_broker(dir.path(), rt, &pki, false);
        let mut c = RawClient::connect_tls(b.addr(), pki.client_config("ca.pem", false)).unwrap();
        produce_and_fetch(&mut c, "secure", &format!("{rt:?}"));
    }
}

#[test]
fn a_client_trusting_another_ca_is_refused() {
    let pki = Pki::new();
    for rt in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let b = tls_broker(dir.path(), rt, &pki, false);
        let e = RawClient::connect_tls(b.addr(), pki.client_config("other-ca.pem", false))
            .expect_err("a certificate from an unknown CA is accepted");
        assert_eq!(
            rustls_error(&e),
            Some(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            )),
            "{rt:?}: {e}"
        );
        // The client told the broker why with an alert.
        wait_for_failures(&b, HandshakeFailure::AlertReceived, 1, &format!("{rt:?}"));
    }
}

#[test]
fn mtls_without_a_client_certificate_is_refused_and_with_one_is_served() {
    let pki = Pki::new();
    for rt in KINDS {
        let what = format!("{rt:?}");
        let dir = tempfile::tempdir().unwrap();
        let b = tls_broker(dir.path(), rt, &pki, true);
        // TLS 1.3: the client finishes its side before the server checks its certificate, so
        // the refusal arrives as an alert on the first read.
        let refused = RawClient::connect_tls(b.addr(), pki.client_config("ca.pem", false))
            .and_then(|mut c| c.call(&Request::HealthCheck));
        let e = refused.expect_err("served without a client certificate");
        assert_eq!(
            rustls_error(&e),
            Some(&rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
            )),
            "{what}: {e}"
        );
        wait_for_failures(&b, HandshakeFailure::NoClientCertificate, 1, &what);
        let mut c = RawClient::connect_tls(b.addr(), pki.client_config("ca.pem", true)).unwrap();
        produce_and_fetch(&mut c, "mutual", &what);
    }
}

#[test]
fn a_plaintext_client_on_the_tls_port_is_closed_and_the_broker_serves_on() {
    let pki = Pki::new();
    for rt in KINDS {
        let what = format!("{rt:?}");
        let dir = tempfile::tempdir().unwrap();
        let b = tls_broker(dir.path(), rt, &pki, false);
        let mut plain = std::net::TcpStream::connect(b.addr()).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = RawClient::connect_lazy();
        let (_, frame) = c.encode(&Request::HealthCheck);
        std::io::Write::write_all(&mut plain, &frame).unwrap();
        // An alert at most, then the end of the stream (or a reset): never a reply.
        let mut got = Vec::new();
        let end = plain.read_to_end(&mut got);
        assert!(
            end.is_ok()
                || end
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{what}: {end:?}"
        );
        assert!(
            got.len() < 16 && got.first() != Some(&frame[0]),
            "{what}: {got:?}"
        );
        wait_for_failures(&b, HandshakeFailure::NotTls, 1, &what);
        let mut c = RawClient::connect_tls(b.addr(), pki.client_config("ca.pem", false)).unwrap();
        produce_and_fetch(&mut c, "after", &what);
    }
}

/// A value of `len` bytes that differs at every position and from every other record's.
fn pattern(record: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ record)
        .collect()
}

#[test]
fn large_fetches_come_back_intact_over_tls() {
    let pki = Pki::new();
    const MIB: usize = 1 << 20;
    for rt in KINDS {
        let what = format!("{rt:?}");
        let dir = tempfile::tempdir().unwrap();
        let b = tls_broker(dir.path(), rt, &pki, false);
        let mut c = RawClient::connect_tls(b.addr(), pki.client_config("ca.pem", false)).unwrap();
        let values: Vec<Vec<u8>> = (0..12u8).map(|r| pattern(r, MIB)).collect();
        for (i, v) in values.iter().enumerate() {
            let r = produce(&mut c, "large", 0, &[v]).unwrap();
            assert_eq!(r.error_code(), 0, "{what}: record {i}");
        }
        // One 1 MiB record, then all twelve pipelined.
        let r = fetch(&mut c, "large", 0, 5, MIB as u32 + 4096).unwrap();
        let Response::Fetch(f) = r.parse(RequestType::Fetch).unwrap() else {
            panic!("{what}: {}", r.error_code())
        };
        let got: Vec<(i64, &[u8])> = f.messages.iter().map(|m| (m.offset, m.value)).collect();
        assert_eq!(got, vec![(5, &values[5][..])], "{what}");
        let mut burst = Vec::new();
        let t = streambus_core::Topic::new("large").unwrap();
        for offset in 0..12 {
            let (_, bytes) = c.encode(&Request::Fetch(streambus_core::FetchRequest {
                topic: t,
                partition: 0,
                offset,
                max_bytes: MIB as u32 + 4096,
                extension: None,
            }));
            burst.extend_from_slice(&bytes);
        }
        c.send_raw(&burst).unwrap();
        for (i, want) in values.iter().enumerate() {
            let r = c.recv().unwrap();
            let Response::Fetch(f) = r.parse(RequestType::Fetch).unwrap() else {
                panic!("{what}: {}", r.error_code())
            };
            let got: Vec<(i64, &[u8])> = f.messages.iter().map(|m| (m.offset, m.value)).collect();
            assert_eq!(got, vec![(i as i64, &want[..])], "{what}: fetch {i}");
        }
    }
}

/// Answers HealthCheck with the client certificate's subject as its status.
struct Subject;

impl Handler for Subject {
    fn handle(&self, _: Flags, _: &Request<'_>, reply: Reply) {
        let subject = reply
            .peer()
            .and_then(|p| p.tls_client_subject.clone())
            .unwrap_or_else(|| "none".into());
        reply.respond(&Response::HealthCheck(HealthCheckResponse {
            status: Text::from(subject.as_str()),
            uptime_secs: 0,
        }));
    }
}

#[test]
fn the_handler_sees_the_client_certificate_subject_on_every_runtime() {
    let pki = Pki::new();
    for rt in RUNTIMES {
        for mtls in [false, true] {
            let options = ServeOptions::default().tls(pki.server_config(mtls));
            let server = streambus_tests::serve(rt, Arc::new(Subject), options);
            let mut c =
                RawClient::connect_tls(server.addr, pki.client_config("ca.pem", mtls)).unwrap();
            let r = c.call(&Request::HealthCheck).unwrap();
            let Response::HealthCheck(h) = r.parse(RequestType::HealthCheck).unwrap() else {
                panic!("{rt:?}: {}", r.error_code())
            };
            // RFC 4514 lists the names in the reverse of the certificate's order (CN, O).
            let want = if mtls {
                "O=StreamBus tests,CN=alice"
            } else {
                "none"
            };
            assert_eq!(h.status.as_str(), Some(want), "{rt:?} mtls={mtls}");
        }
    }
}

#[test]
fn the_adapters_clients_speak_tls_on_every_runtime() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = tls_broker(dir.path(), RuntimeKind::Tokio, &pki, true);
    let tls = pki.client_tls("ca.pem", true);
    let config = streambus_core::ClientConfig::default();
    let healthy = |r: Response<'_>| matches!(r, Response::HealthCheck(h) if h.status.as_str() == Some("healthy"));
    let mut c =
        streambus_adapters::blocking::connect_tls::<4>(b.addr(), &tls, config, 1 << 16).unwrap();
    assert!(
        healthy(c.request(&Request::HealthCheck).unwrap()),
        "blocking"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c =
                streambus_adapters::tokio::connect_tls::<4>(b.addr(), &tls, config, 1 << 16)
                    .await
                    .unwrap();
            assert!(
                healthy(c.request(&Request::HealthCheck).await.unwrap()),
                "tokio"
            );
        });
    smol::block_on(async {
        let mut c = streambus_adapters::smol::connect_tls::<4>(b.addr(), &tls, config, 1 << 16)
            .await
            .unwrap();
        assert!(
            healthy(c.request(&Request::HealthCheck).await.unwrap()),
            "smol"
        );
    });
}

/// With `--auth-file` and mTLS, a client certificate whose subject is a principal's name in the
/// file authenticates the connection as that principal (its permissions apply: 41 outside
/// them), whether the entry has a token too or not; a certificate naming no principal leaves
/// the connection unauthenticated (40).
#[test]
fn a_client_certificate_subject_names_its_principal() {
    use streambus_server::auth::token_sha256_hex;
    let pki = Pki::new();
    let token = format!(
        "token_sha256 = \"{}\", ",
        token_sha256_hex("an unused token")
    );
    for (name, token, produce_code, other_code) in [
        ("O=StreamBus tests,CN=alice", token.as_str(), 0, 41),
        ("O=StreamBus tests,CN=alice", "", 0, 41),
        ("CN=somebody else", token.as_str(), 40, 40),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("auth.toml");
        std::fs::write(
            &auth,
            format!("[principals]\n{name:?} = {{ {token}produce = [\"secure\"] }}\n"),
        )
        .unwrap();
        let mut c = broker_config(&dir.path().join("data"), RuntimeKind::Tokio);
        c.tls = Some(pki.broker_files(true));
        c.auth_file = Some(auth);
        let b = streambus_server::start(c).unwrap();
        let mut c = RawClient::connect_tls(b.addr(), pki.client_config("ca.pem", true)).unwrap();
        let r = produce(&mut c, "secure", 0, &[b"v"]).unwrap();
        assert_eq!(r.error_code(), produce_code, "{name}: produce to secure");
        let r = produce(&mut c, "other", 0, &[b"v"]).unwrap();
        assert_eq!(r.error_code(), other_code, "{name}: produce to other");
    }
}
