//! Certificates made by the tests (rcgen) and a TLS stream for [`RawClient`](crate::RawClient).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use streambus_adapters::tls::{self, rustls};

/// A CA, a server certificate for `localhost` and 127.0.0.1 and a client certificate
/// (`CN=alice`, `O=StreamBus tests`) signed by it, and a second CA that signed nothing of
/// these: PEM files in a temporary directory.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates the certificates.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca = |cn: &str, cert: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            write(cert, params.self_signed(&key).unwrap().pem());
            Issuer::new(params, key)
        };
        let issuer = ca("StreamBus test CA", "ca.pem");
        ca("Another CA", "other-ca.pem");
        let leaf = |names: Vec<String>, cn: &str, cert: &str, key_file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params
                .distinguished_name
                .push(DnType::OrganizationName, "StreamBus tests");
            write(cert, params.signed_by(&key, &issuer).unwrap().pem());
            write(key_file, key.serialize_pem());
        };
        leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            "localhost",
            "server.pem",
            "server-key.pem",
        );
        leaf(vec![], "alice", "client.pem", "client-key.pem");
        Self { dir }
    }

    /// A file of the set (`ca.pem`, `other-ca.pem`, `server.pem`, `server-key.pem`,
    /// `client.pem`, `client-key.pem`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's TLS files; with `mtls`, client certificates signed by the CA are required.
    pub fn broker_files(&self, mtls: bool) -> streambus_server::TlsFiles {
        let files =
            streambus_server::TlsFiles::new(self.path("server.pem"), self.path("server-key.pem"));
        if mtls {
            files.client_ca(self.path("ca.pem"))
        } else {
            files
        }
    }

    /// A server configuration for the adapters (`mtls` as in [`broker_files`](Self::broker_files)).
    pub fn server_config(&self, mtls: bool) -> Arc<rustls::ServerConfig> {
        let ca = self.path("ca.pem");
        tls::server_config(
            &self.path("server.pem"),
            &self.path("server-key.pem"),
            mtls.then_some(ca.as_path()),
        )
        .expect("server config")
    }

    /// A client configuration trusting `ca` (a file of the set), with the client certificate
    /// when `with_cert`.
    pub fn client_config(&self, ca: &str, with_cert: bool) -> Arc<rustls::ClientConfig> {
        let (cert, key) = (self.path("client.pem"), self.path("client-key.pem"));
        tls::client_config(
            Some(&self.path(ca)),
            with_cert.then_some((cert.as_path(), key.as_path())),
        )
        .expect("client config")
    }

    /// What the adapters' `connect_tls` takes: trusting `ca`, name `localhost`.
    pub fn client_tls(&self, ca: &str, with_cert: bool) -> tls::ClientTls {
        tls::ClientTls {
            config: self.client_config(ca, with_cert),
            server_name: tls::server_name("localhost").unwrap(),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A test client's connection: plaintext or TLS.
#[derive(Debug)]
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref(),
        }
    }

    /// Connects over TLS to a server named `localhost` and completes the handshake: a refused
    /// certificate is an error here, whose inner error is the [`rustls::Error`].
    pub fn tls(stream: TcpStream, config: Arc<rustls::ClientConfig>) -> io::Result<Self> {
        let name = tls::server_name("localhost").map_err(io::Error::other)?;
        let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, stream);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Self::Tls(Box::new(s)))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// The [`rustls::Error`] inside an I/O error, if any.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref())
}
