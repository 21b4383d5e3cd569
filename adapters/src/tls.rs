//! TLS with [`rustls`] and its *ring* crypto provider (feature `tls`): building server and
//! client configurations from PEM files, and what the runtimes share of a TLS connection.
//!
//! *ring* rather than aws-lc-rs: both build from crates alone with the C compiler, but *ring*
//! builds several times faster (no large C library, no CMake fallback), and its AES-GCM and
//! ChaCha20 are assembly on x86-64 and aarch64.
//!
//! The server side: put a configuration from [`server_config`] in
//! [`ServeOptions::tls`](crate::ServeOptions::tls); each accepted connection runs its handshake
//! on its own task (thread, on the blocking runtime) with the read timeout as its deadline, and
//! a failed handshake is reported as [`ConnEvent::TlsHandshakeFailed`](crate::ConnEvent) with
//! its [`HandshakeFailure`]. A verified client certificate's subject
//! reaches the handler as [`Peer::tls_client_subject`](crate::Peer::tls_client_subject).
//!
//! File ranges of a fetch can't go out with `sendfile` through TLS: they are read into one
//! reusable buffer per connection, in pieces of [`FILE_PIECE`] bytes, and written through
//! rustls, which seals them into full-size records.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use crate::{FileChunk, HandshakeFailure};

/// The size of the pieces a file range is read in when it can't be sent with `sendfile`.
pub const FILE_PIECE: usize = 256 * 1024;

/// A TLS file that can't be used: says which file and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The file can't be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not PEM, or holds no item of the kind wanted.
    #[error("{}: {problem}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong (`no certificate in the file`, …).
        problem: String,
    },
    /// rustls refused what the files hold (a key that does not match its certificate, a CA
    /// certificate it can't parse).
    #[error("{what}: {source}")]
    Rejected {
        /// What was being built.
        what: &'static str,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The host name can't be a TLS server name.
    #[error("{name:?} is not a valid TLS server name")]
    ServerName {
        /// The name.
        name: String,
    },
}

/// The crypto provider every configuration here uses: *ring*, with the AES-128-GCM suites
/// preferred to AES-256-GCM (equally sound for TLS, and four fewer AES rounds per block on the
/// bulk path of large fetches); the other suites follow in *ring*'s order.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as C;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsConfigError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsConfigError::Read {
            path: path.to_owned(),
            source,
        },
        other => TlsConfigError::Pem {
            path: path.to_owned(),
            problem: format!("not a valid PEM file ({other:?})"),
        },
    }
}

/// Reads every certificate of a PEM file (a chain: the leaf first); at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsConfigError::Pem {
            path: path.to_owned(),
            problem: "no certificate in the file (want a PEM \"BEGIN CERTIFICATE\" block)".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsConfigError::Pem {
            path: path.to_owned(),
            problem: "no private key in the file (want a PEM \"BEGIN PRIVATE KEY\" block)".into(),
        },
        other => pem_error(path, other),
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsConfigError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        store.add(cert).map_err(|source| TlsConfigError::Rejected {
            what: "a CA certificate",
            source,
        })?;
    }
    Ok(store)
}

/// The files of a server configuration, to tell which one a [`TlsConfigError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerFile {
    /// The certificate chain.
    Cert,
    /// The private key.
    Key,
    /// The CA that signs client certificates.
    ClientCa,
}

/// A server configuration: the certificate chain and key (PEM), and when `client_ca` is given,
/// client certificates signed by it are required (mTLS). The error names the file at fault.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, (ServerFile, TlsConfigError)> {
    let chain = load_certs(cert).map_err(|e| (ServerFile::Cert, e))?;
    let key = load_key(key).map_err(|e| (ServerFile::Key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| {
            (
                ServerFile::Cert,
                TlsConfigError::Rejected {
                    what: "the protocol versions",
                    source,
                },
            )
        })?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = Arc::new(roots(ca).map_err(|e| (ServerFile::ClientCa, e))?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| {
                    (
                        ServerFile::ClientCa,
                        TlsConfigError::Rejected {
                            what: "the client CA",
                            source: rustls::Error::General(e.to_string()),
                        },
                    )
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|source| {
        (
            ServerFile::Key,
            TlsConfigError::Rejected {
                what: "the key and certificate",
                source,
            },
        )
    })?;
    Ok(Arc::new(config))
}

/// A client configuration trusting the CA certificates in `ca` (PEM), or the system's trust
/// store when `None`; with a client certificate chain and key (PEM) for mTLS.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let roots = match ca {
        Some(ca) => roots(ca)?,
        None => {
            let mut store = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            store
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsConfigError::Rejected {
            what: "the protocol versions",
            source,
        })?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|source| TlsConfigError::Rejected {
                what: "the client key and certificate",
                source,
            })?,
    };
    Ok(Arc::new(config))
}

/// The name to check the server's certificate against: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| TlsConfigError::ServerName {
        name: host.to_owned(),
    })
}

/// What a client connection needs for TLS: the configuration and the name the server's
/// certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The rustls configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// The server name to verify.
    pub server_name: ServerName<'static>,
}

/// Why a handshake failed, from the error rustls (or the socket) gave.
pub(crate) fn classify(e: &io::Error) -> HandshakeFailure {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_))
        | Some(E::InappropriateMessage { .. })
        | Some(E::InappropriateHandshakeMessage { .. }) => HandshakeFailure::NotTls,
        Some(E::NoCertificatesPresented) => HandshakeFailure::NoClientCertificate,
        Some(E::InvalidCertificate(_)) => HandshakeFailure::BadCertificate,
        Some(E::PeerIncompatible(_)) => HandshakeFailure::Incompatible,
        Some(E::AlertReceived(_)) => HandshakeFailure::AlertReceived,
        Some(_) => HandshakeFailure::Other,
        None if matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) =>
        {
            HandshakeFailure::Timeout
        }
        None => HandshakeFailure::Io,
    }
}

/// The subject of the verified client certificate (the first of the chain the peer sent), as
/// RFC 4514 text.
pub(crate) fn client_subject(conn: &rustls::ServerConnection) -> Option<String> {
    use x509_cert::der::Decode;
    let leaf = conn.peer_certificates()?.first()?;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref()).ok()?;
    Some(cert.tbs_certificate.subject.to_string())
}

/// A file range read into memory for a stream that can't `sendfile` (TLS): pieces of
/// [`FILE_PIECE`] bytes are read into one reusable buffer and handed out until written.
#[derive(Debug, Default)]
pub(crate) struct FileReader {
    buf: Vec<u8>,
    /// `buf[start..end]` holds the file's bytes from `offset` on, of the file at `file`.
    file: usize,
    offset: u64,
    start: usize,
    end: usize,
}

impl FileReader {
    /// The next bytes of `chunk`: what is buffered when it continues the range, else a piece
    /// read from the file.
    pub(crate) fn bytes(&mut self, chunk: &FileChunk) -> io::Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        let file = Arc::as_ptr(&chunk.file) as usize;
        if self.start >= self.end || self.file != file || self.offset != chunk.offset {
            let want = usize::try_from(chunk.len)
                .unwrap_or(FILE_PIECE)
                .min(FILE_PIECE);
            if self.buf.len() < want {
                self.buf.resize(FILE_PIECE, 0);
            }
            let n = chunk.file.read_at(&mut self.buf[..want], chunk.offset)?;
            if n == 0 && want > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file range ends early",
                ));
            }
            (self.file, self.offset, self.start, self.end) = (file, chunk.offset, 0, n);
        }
        let len = usize::try_from(chunk.len).unwrap_or(usize::MAX);
        let end = self.end.min(self.start.saturating_add(len));
        Ok(&self.buf[self.start..end])
    }

    /// Gives the buffer back (a quiet connection); the next range reads anew.
    pub(crate) fn release(&mut self) {
        if self.buf.capacity() > 0 {
            *self = Self::default();
        }
    }

    /// Records that `n` bytes of what [`bytes`](Self::bytes) gave were written.
    pub(crate) fn consumed(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        self.offset += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range longer than a piece comes out whole and in order however little each write
    /// takes, the buffer serving each piece until it is written; a released buffer reads anew.
    #[test]
    fn file_reader_hands_out_a_range_in_pieces() {
        use std::io::Write as _;
        let path =
            std::env::temp_dir().join(format!("streambus-filereader-{}", std::process::id()));
        let data: Vec<u8> = (0..FILE_PIECE * 2 + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let mut chunk = FileChunk {
            file,
            offset: 10,
            len: (data.len() - 20) as u64,
        };
        let mut r = FileReader::default();
        let mut out = Vec::new();
        let mut writes = 0;
        while chunk.len > 0 {
            let bytes = r.bytes(&chunk).unwrap();
            assert!(!bytes.is_empty() && bytes.len() <= FILE_PIECE);
            // Take an odd amount each time, as a socket might.
            let n = bytes.len().min(100_000 + writes);
            out.extend_from_slice(&bytes[..n]);
            r.consumed(n);
            chunk.offset += n as u64;
            chunk.len -= n as u64;
            writes += 1;
            if writes == 3 {
                r.release();
            }
        }
        assert_eq!(out, data[10..data.len() - 10]);
    }
}
