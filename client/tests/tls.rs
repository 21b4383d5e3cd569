//! The SDK over TLS (certificates made by the tests): the async, blocking and smol clients
//! produce and consume through a TLS broker; a broker certificate from another CA and a
//! missing client certificate are `Error::Tls` with rustls's reason.

use std::time::Duration;

use streambus_client::rustls::{AlertDescription, CertificateError};
use streambus_client::{Client, ClientBuilder, Error, Offset, Record, rustls};
use streambus_server::{Running, RuntimeKind};
use streambus_tests::tls::Pki;

fn broker(dir: &std::path::Path, pki: &Pki, mtls: bool) -> Running {
    let mut c = streambus_tests::broker_config(dir, RuntimeKind::Tokio);
    c.tls = Some(pki.broker_files(mtls));
    streambus_server::start(c).unwrap()
}

/// `localhost:PORT`: the server name defaults to the host, which the certificate carries.
fn addr(b: &Running) -> String {
    format!("localhost:{}", b.addr().port())
}

fn builder(pki: &Pki, ca: &str, with_cert: bool) -> ClientBuilder {
    let b = Client::builder()
        .tls_ca_file(pki.path(ca))
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(5));
    if with_cert {
        b.tls_client_cert(pki.path("client.pem"), pki.path("client-key.pem"))
    } else {
        b
    }
}

fn tls_source(e: &Error) -> &rustls::Error {
    match e {
        Error::Tls { source, .. } => source,
        other => panic!("not a TLS error: {other:?}"),
    }
}

#[tokio::test]
async fn the_async_client_produces_and_consumes_over_mtls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path(), &pki, true);
    let c = builder(&pki, "ca.pem", true)
        .connect(addr(&b))
        .await
        .unwrap();
    assert!(c.create_topic("secure", 1).await.unwrap());
    let p = streambus_client::Producer::new(&c);
    let m = p.send(Record::new("secure", "hello")).await.unwrap();
    assert_eq!((m.partition, m.offset), (0, 0));
    let mut consumer = streambus_client::Consumer::new(&c);
    consumer
        .assign("secure", 0, Offset::Earliest)
        .await
        .unwrap();
    let got = consumer.poll(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|r| (r.offset, r.value()))
            .collect::<Vec<_>>(),
        vec![(0, &b"hello"[..])]
    );
}

#[tokio::test]
async fn a_broker_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path(), &pki, false);
    let e = builder(&pki, "other-ca.pem", false)
        .connect(addr(&b))
        .await
        .unwrap_err();
    assert_eq!(
        tls_source(&e),
        &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        "{e}"
    );
    assert!(!e.is_retriable());
    assert!(
        e.to_string()
            .starts_with("connect: TLS: invalid peer certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_name_the_certificate_does_not_carry_is_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path(), &pki, false);
    let e = builder(&pki, "ca.pem", false)
        .tls_server_name("broker.example")
        .connect(addr(&b))
        .await
        .unwrap_err();
    assert!(
        matches!(
            tls_source(&e),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
        ),
        "{e}"
    );
}

#[tokio::test]
async fn mtls_without_a_client_certificate_is_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path(), &pki, true);
    // TLS 1.3: the client's side of the handshake completes; the refusal is the first answer.
    let e = match builder(&pki, "ca.pem", false).connect(addr(&b)).await {
        Ok(c) => c.health().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(
        tls_source(&e),
        &rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        "{e}"
    );
}

#[test]
fn the_blocking_client_speaks_tls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path(), &pki, true);
    let c =
        streambus_client::blocking::Client::connect_with(builder(&pki, "ca.pem", true), addr(&b))
            .unwrap();
    let p = streambus_client::blocking::Producer::new(&c);
    assert_eq!(p.send(Record::new("sync", "one")).unwrap().offset, 0);
    let e = streambus_client::blocking::Client::connect_with(
        builder(&pki, "other-ca.pem", false),
        addr(&b),
    )
    .unwrap_err();
    assert!(
        matches!(tls_source(&e), rustls::Error::InvalidCertificate(_)),
        "{e}"
    );
}

#[cfg(feature = "smol")]
#[test]
fn the_smol_client_speaks_tls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path(), &pki, true);
    smol::block_on(async {
        let c =
            streambus_client::smol::Client::connect_with(builder(&pki, "ca.pem", true), addr(&b))
                .await
                .unwrap();
        let p = streambus_client::smol::Producer::new(&c);
        assert_eq!(p.send(Record::new("sync", "two")).await.unwrap().offset, 0);
    });
}

#[test]
fn tls_files_that_cannot_be_read_are_a_config_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(
            Client::builder()
                .tls_ca_file("/nonexistent/ca.pem")
                .connect("localhost:9"),
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::Config { setting: "tls", reason } if reason.starts_with("/nonexistent/ca.pem: ")),
        "{e}"
    );
}
