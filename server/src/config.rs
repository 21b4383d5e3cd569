//! Broker settings: defaults, then an optional TOML file (`--config`), then `STREAMBUS_*`
//! environment variables, then command-line flags — each overriding the one before.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// An invalid setting: names it and says why. The binary prints it on one line and exits 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value that can't be used.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The setting's name (as a flag).
        setting: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The config file can't be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Durability policy names, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// fsync before every acknowledgement (group commit).
    Always,
    /// fsync every `--fsync-interval`.
    Interval,
    /// Leave it to the OS.
    Never,
}

/// Which adapter serves connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// tokio, multi-threaded.
    Tokio,
    /// smol (async-io).
    Smol,
    /// std threads, one per connection.
    Blocking,
}

/// The `streambus-server` command line. Every flag can also come from the environment
/// (`STREAMBUS_LISTEN`, …) or the `--config` TOML file (same names, `_` for `-`).
#[derive(Debug, Default, Parser)]
#[command(name = "streambus-server", version, about = "The StreamBus broker")]
pub struct Cli {
    /// TOML config file.
    #[arg(long, env = "STREAMBUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to accept clients on [default: 127.0.0.1:9092].
    #[arg(long, env = "STREAMBUS_LISTEN")]
    pub listen: Option<String>,
    /// Data directory [default: ./streambus-data].
    #[arg(long, env = "STREAMBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Durability policy [default: interval].
    #[arg(long, env = "STREAMBUS_FSYNC")]
    pub fsync: Option<FsyncMode>,
    /// fsync interval for `--fsync interval` [default: 1s].
    #[arg(long, env = "STREAMBUS_FSYNC_INTERVAL")]
    pub fsync_interval: Option<String>,
    /// Connections open at once [default: 10000].
    #[arg(long, env = "STREAMBUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest frame Length accepted and sent [default: 10485760].
    #[arg(long, env = "STREAMBUS_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<u32>,
    /// A half-received frame is dropped after this long without progress [default: 30s].
    #[arg(long, env = "STREAMBUS_READ_TIMEOUT")]
    pub read_timeout: Option<String>,
    /// A write that takes longer closes the connection [default: 30s].
    #[arg(long, env = "STREAMBUS_WRITE_TIMEOUT")]
    pub write_timeout: Option<String>,
    /// A connection with no frame for this long is closed [default: 10m].
    #[arg(long, env = "STREAMBUS_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Bytes all connections together may hold in buffers; over it they stop reading
    /// [default: 536870912].
    #[arg(long, env = "STREAMBUS_MAX_BUFFERED_BYTES")]
    pub max_buffered_bytes: Option<usize>,
    /// The longest a long-poll Fetch waits; a larger MaxWaitMs is cut to it [default: 30s].
    #[arg(long, env = "STREAMBUS_MAX_FETCH_WAIT")]
    pub max_fetch_wait: Option<String>,
    /// Create a missing topic (one partition) on Produce [default: true].
    #[arg(long, env = "STREAMBUS_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// Address of the Prometheus /metrics listener; `off` disables it [default: 127.0.0.1:9100].
    #[arg(long, env = "STREAMBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Connection runtime [default: tokio].
    #[arg(long, env = "STREAMBUS_RUNTIME")]
    pub runtime: Option<RuntimeKind>,
    /// Serve TLS with this certificate chain (PEM, the server's certificate first); needs
    /// --tls-key.
    #[arg(long, env = "STREAMBUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "STREAMBUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "STREAMBUS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// HOST:PORT clients are told to connect to in Metadata replies [default: the listen
    /// address; 127.0.0.1 with its port when listening on 0.0.0.0 or ::].
    #[arg(long, env = "STREAMBUS_ADVERTISE")]
    pub advertise: Option<String>,
    /// This broker's node id in Metadata replies, 0 to 2147483647 [default: 0].
    #[arg(long, env = "STREAMBUS_NODE_ID")]
    pub node_id: Option<u32>,
    /// Require token authentication, with the principals and per-topic permissions of this
    /// TOML file (reloaded on SIGHUP) [default: off].
    #[arg(long, env = "STREAMBUS_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Idempotent producers whose state each partition keeps; past it the least recently used
    /// is forgotten [default: 10000].
    #[arg(long, env = "STREAMBUS_MAX_PRODUCERS_PER_PARTITION")]
    pub max_producers_per_partition: Option<usize>,
}

/// The `--config` file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    fsync: Option<FsyncMode>,
    fsync_interval: Option<String>,
    max_connections: Option<usize>,
    max_frame_bytes: Option<u32>,
    read_timeout: Option<String>,
    write_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_fetch_wait: Option<String>,
    max_buffered_bytes: Option<usize>,
    auto_create_topics: Option<bool>,
    metrics_listen: Option<String>,
    runtime: Option<RuntimeKind>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    advertise: Option<String>,
    node_id: Option<u32>,
    auth_file: Option<PathBuf>,
    max_producers_per_partition: Option<usize>,
}

/// The resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Durability policy.
    pub fsync: FsyncMode,
    /// Interval for [`FsyncMode::Interval`].
    pub fsync_interval: Duration,
    /// Connection cap.
    pub max_connections: usize,
    /// Largest frame Length.
    pub max_frame_bytes: u32,
    /// Read timeout for half-received frames.
    pub read_timeout: Duration,
    /// Write timeout.
    pub write_timeout: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// The longest a long-poll Fetch waits.
    pub max_fetch_wait: Duration,
    /// The memory budget of all connections' buffers.
    pub max_buffered_bytes: usize,
    /// Auto-create topics on Produce.
    pub auto_create_topics: bool,
    /// Metrics listener; `None` = off.
    pub metrics_listen: Option<SocketAddr>,
    /// Connection runtime.
    pub runtime: RuntimeKind,
    /// TLS files; `None` = plaintext.
    pub tls: Option<TlsFiles>,
    /// The address advertised in Metadata replies; `None` = derived from the listen address
    /// once bound (see [`Advertised::for_listener`]).
    pub advertise: Option<Advertised>,
    /// This broker's node id (fits an i32: it is also the LeaderID).
    pub node_id: u32,
    /// The auth file (principals, token hashes, permissions); `None`: no authentication.
    pub auth_file: Option<PathBuf>,
    /// Idempotent producers kept per partition (least recently used forgotten past it).
    pub max_producers_per_partition: NonZeroUsize,
}

/// The PEM files of the broker's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// Certificate chain (`--tls-cert`).
    pub cert: PathBuf,
    /// Private key (`--tls-key`).
    pub key: PathBuf,
    /// CA of the client certificates required (`--tls-client-ca`); `None` = no client
    /// certificates.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Certificate and key, no client certificates.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
        }
    }

    /// Requires client certificates signed by `ca`.
    pub fn client_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(ca.into());
        self
    }

    /// Loads the files into a rustls configuration; the error names the setting at fault.
    pub fn load(
        &self,
    ) -> Result<std::sync::Arc<streambus_adapters::tls::rustls::ServerConfig>, ConfigError> {
        use streambus_adapters::tls::{ServerFile, server_config};
        server_config(&self.cert, &self.key, self.client_ca.as_deref()).map_err(|(file, e)| {
            ConfigError::Invalid {
                setting: match file {
                    ServerFile::Key => "--tls-key",
                    ServerFile::ClientCa => "--tls-client-ca",
                    _ => "--tls-cert",
                },
                reason: e.to_string(),
            }
        })
    }
}

/// The address a broker advertises to clients (§6.4): a host name or IP, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// Port, never 0.
    pub port: u16,
}

impl Advertised {
    /// Parses `HOST:PORT` (`[v6]:PORT` for an IPv6 address).
    pub fn parse(setting: &'static str, v: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid {
            setting,
            reason: format!("{v:?} is not an address like broker1.example.com:9092 ({why})"),
        };
        let (host, port) = v.rsplit_once(':').ok_or_else(|| bad("no :PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port 0 cannot be connected to"));
        }
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err(bad("the bracketed host is not an IPv6 address")),
            None if host.contains(':') => return Err(bad("an IPv6 address needs [brackets]")),
            None => host,
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("the host is empty or has spaces"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// What a broker bound to `bound` advertises without a setting: that address, or
    /// 127.0.0.1 with its port when it is unspecified (0.0.0.0 or ::). The flag is `true` in
    /// that second case, for the warning at start.
    pub fn for_listener(bound: SocketAddr) -> (Self, bool) {
        let unspecified = bound.ip().is_unspecified();
        let host = if unspecified {
            "127.0.0.1".to_owned()
        } else {
            bound.ip().to_string()
        };
        (
            Self {
                host,
                port: bound.port(),
            },
            unspecified,
        )
    }
}

impl std::fmt::Display for Advertised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            data_dir: PathBuf::from("./streambus-data"),
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_secs(1),
            max_connections: 10_000,
            max_frame_bytes: streambus_core::DEFAULT_MAX_FRAME_LEN,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_fetch_wait: Duration::from_secs(30),
            max_buffered_bytes: 512 << 20,
            auto_create_topics: true,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9100))),
            runtime: RuntimeKind::Tokio,
            tls: None,
            advertise: None,
            node_id: 0,
            auth_file: None,
            max_producers_per_partition: crate::storage::DEFAULT_MAX_PRODUCERS_PER_PARTITION,
        }
    }
}

fn duration(setting: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v.trim()).map_err(|e| ConfigError::Invalid {
        setting,
        reason: format!("{v:?} is not a duration like 500ms, 30s or 10m ({e})"),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            setting,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(d)
}

fn addr(setting: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| ConfigError::Invalid {
        setting,
        reason: format!("{v:?} is not an address like 127.0.0.1:9092"),
    })
}

impl Config {
    /// Resolves the command line (with its environment) and the config file it names.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let listen = match cli.listen.or(file.listen) {
            Some(v) => addr("--listen", &v)?,
            None => d.listen,
        };
        let metrics_listen = match cli.metrics_listen.or(file.metrics_listen) {
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            Some(v) => Some(addr("--metrics-listen", &v)?),
            None => d.metrics_listen,
        };
        let dur = |setting, a: Option<String>, b: Option<String>, default| match a.or(b) {
            Some(v) => duration(setting, &v),
            None => Ok(default),
        };
        let max_frame_bytes = cli
            .max_frame_bytes
            .or(file.max_frame_bytes)
            .unwrap_or(d.max_frame_bytes);
        if max_frame_bytes < 1024 {
            return Err(ConfigError::Invalid {
                setting: "--max-frame-bytes",
                reason: format!("{max_frame_bytes} is below the minimum of 1024"),
            });
        }
        let max_connections = cli
            .max_connections
            .or(file.max_connections)
            .unwrap_or(d.max_connections);
        if max_connections == 0 {
            return Err(ConfigError::Invalid {
                setting: "--max-connections",
                reason: "must be at least 1".into(),
            });
        }
        let max_buffered_bytes = cli
            .max_buffered_bytes
            .or(file.max_buffered_bytes)
            .unwrap_or(d.max_buffered_bytes);
        // One frame of the largest size must fit, or it could never be received.
        let one_frame = 2 * (max_frame_bytes as usize + 4);
        if max_buffered_bytes < one_frame {
            return Err(ConfigError::Invalid {
                setting: "--max-buffered-bytes",
                reason: format!(
                    "{max_buffered_bytes} cannot hold a frame of --max-frame-bytes {max_frame_bytes}: want at least {one_frame}"
                ),
            });
        }
        let tls = match (
            cli.tls_cert.or(file.tls_cert),
            cli.tls_key.or(file.tls_key),
            cli.tls_client_ca.or(file.tls_client_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => {
                let files = TlsFiles {
                    cert,
                    key,
                    client_ca,
                };
                // Refused now, with the setting named, rather than at the first connection.
                files.load()?;
                Some(files)
            }
            (None, _, _) => {
                return Err(ConfigError::Invalid {
                    setting: "--tls-cert",
                    reason: "missing: --tls-key and --tls-client-ca need a certificate".into(),
                });
            }
            (Some(_), None, _) => {
                return Err(ConfigError::Invalid {
                    setting: "--tls-key",
                    reason: "missing: --tls-cert needs its private key".into(),
                });
            }
        };
        let advertise = match cli.advertise.or(file.advertise) {
            Some(v) => Some(Advertised::parse("--advertise", &v)?),
            None => None,
        };
        let node_id = cli.node_id.or(file.node_id).unwrap_or(d.node_id);
        if i32::try_from(node_id).is_err() {
            return Err(ConfigError::Invalid {
                setting: "--node-id",
                reason: format!("{node_id} is above the largest node id, 2147483647"),
            });
        }
        let auth_file = cli.auth_file.or(file.auth_file);
        if let Some(path) = &auth_file {
            // Checked now, so a broken file stops the start with one line (exit 2).
            crate::auth::Policy::load(path).map_err(|e| ConfigError::Invalid {
                setting: "--auth-file",
                reason: e.to_string(),
            })?;
        }
        let max_producers_per_partition = match cli
            .max_producers_per_partition
            .or(file.max_producers_per_partition)
        {
            Some(n) => NonZeroUsize::new(n).ok_or_else(|| ConfigError::Invalid {
                setting: "--max-producers-per-partition",
                reason: "must be at least 1".into(),
            })?,
            None => d.max_producers_per_partition,
        };
        Ok(Self {
            tls,
            listen,
            data_dir: cli.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            fsync: cli.fsync.or(file.fsync).unwrap_or(d.fsync),
            fsync_interval: dur(
                "--fsync-interval",
                cli.fsync_interval,
                file.fsync_interval,
                d.fsync_interval,
            )?,
            max_connections,
            max_frame_bytes,
            read_timeout: dur(
                "--read-timeout",
                cli.read_timeout,
                file.read_timeout,
                d.read_timeout,
            )?,
            write_timeout: dur(
                "--write-timeout",
                cli.write_timeout,
                file.write_timeout,
                d.write_timeout,
            )?,
            idle_timeout: dur(
                "--idle-timeout",
                cli.idle_timeout,
                file.idle_timeout,
                d.idle_timeout,
            )?,
            max_fetch_wait: dur(
                "--max-fetch-wait",
                cli.max_fetch_wait,
                file.max_fetch_wait,
                d.max_fetch_wait,
            )?,
            max_buffered_bytes,
            auto_create_topics: cli
                .auto_create_topics
                .or(file.auto_create_topics)
                .unwrap_or(d.auto_create_topics),
            metrics_listen,
            runtime: cli.runtime.or(file.runtime).unwrap_or(d.runtime),
            advertise,
            node_id,
            auth_file,
            max_producers_per_partition,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.message().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["streambus-server"];
        all.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(all).unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(c.idle_timeout, Duration::from_secs(600));
    }

    #[test]
    fn durations_and_flags() {
        let c = parse(&[
            "--read-timeout",
            "500ms",
            "--write-timeout",
            "30s",
            "--idle-timeout",
            "10m",
            "--fsync",
            "never",
            "--runtime",
            "smol",
            "--metrics-listen",
            "off",
        ])
        .unwrap();
        assert_eq!(c.read_timeout, Duration::from_millis(500));
        assert_eq!(c.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.fsync, FsyncMode::Never);
        assert_eq!(c.runtime, RuntimeKind::Smol);
        assert_eq!(c.metrics_listen, None);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = parse(&["--read-timeout", "soon"]).unwrap_err().to_string();
        assert!(e.starts_with("invalid setting --read-timeout:"), "{e}");
        let e = parse(&["--listen", "nowhere"]).unwrap_err().to_string();
        assert!(e.contains("--listen"), "{e}");
        let e = parse(&["--max-frame-bytes", "10"]).unwrap_err().to_string();
        assert!(e.contains("--max-frame-bytes"), "{e}");
        let e = parse(&["--max-producers-per-partition", "0"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid setting --max-producers-per-partition: must be at least 1"
        );
    }

    #[test]
    fn max_producers_per_partition_from_flag_and_file() {
        assert_eq!(
            parse(&[]).unwrap().max_producers_per_partition.get(),
            10_000
        );
        let c = parse(&["--max-producers-per-partition", "7"]).unwrap();
        assert_eq!(c.max_producers_per_partition.get(), 7);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sb.toml");
        std::fs::write(&path, "max_producers_per_partition = 3\n").unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.max_producers_per_partition.get(), 3);
    }

    #[test]
    fn tls_files_that_cannot_be_used_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk = junk.to_str().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let e = parse(&["--tls-cert", junk]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid setting --tls-key: missing: --tls-cert needs its private key"
        );
        let e = parse(&["--tls-key", junk]).unwrap_err().to_string();
        assert!(e.starts_with("invalid setting --tls-cert: missing"), "{e}");
        let e = parse(&["--tls-cert", missing, "--tls-key", junk])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("invalid setting --tls-cert: {missing}: ")),
            "{e}"
        );
        let e = parse(&["--tls-cert", junk, "--tls-key", junk])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "invalid setting --tls-cert: {junk}: no certificate in the file (want a PEM \"BEGIN CERTIFICATE\" block)"
            )
        );
    }

    #[test]
    fn advertise_and_node_id() {
        let c = parse(&["--advertise", "broker1.example.com:9093", "--node-id", "7"]).unwrap();
        assert_eq!(
            c.advertise,
            Some(Advertised {
                host: "broker1.example.com".into(),
                port: 9093
            })
        );
        assert_eq!(c.node_id, 7);
        let c = parse(&["--advertise", "[::1]:9092"]).unwrap();
        let a = c.advertise.unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 9092));
        assert_eq!(a.to_string(), "[::1]:9092");
        for bad in [
            "nohost", ":9092", "h:0", "h:65536", "::1:9092", "[x]:1", "a b:1",
        ] {
            let e = parse(&["--advertise", bad]).unwrap_err().to_string();
            assert!(e.starts_with("invalid setting --advertise:"), "{bad}: {e}");
        }
        let e = parse(&["--node-id", "2147483648"]).unwrap_err().to_string();
        assert!(e.starts_with("invalid setting --node-id:"), "{e}");
    }

    #[test]
    fn unspecified_listen_advertises_loopback() {
        let (a, warn) = Advertised::for_listener("0.0.0.0:7000".parse().unwrap());
        assert_eq!((a.host.as_str(), a.port, warn), ("127.0.0.1", 7000, true));
        let (a, warn) = Advertised::for_listener("[::]:7001".parse().unwrap());
        assert_eq!((a.host.as_str(), a.port, warn), ("127.0.0.1", 7001, true));
        let (a, warn) = Advertised::for_listener("10.1.2.3:7002".parse().unwrap());
        assert_eq!((a.to_string(), warn), ("10.1.2.3:7002".to_owned(), false));
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sb.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\nfsync = \"always\"\nidle_timeout = \"1m\"\nadvertise = \"b.example:7000\"\nnode_id = 3\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p]).unwrap();
        assert_eq!(
            (c.listen.port(), c.fsync, c.idle_timeout),
            (7000, FsyncMode::Always, Duration::from_secs(60))
        );
        assert_eq!(
            (c.advertise.map(|a| a.to_string()), c.node_id),
            (Some("b.example:7000".to_owned()), 3)
        );
        let c = parse(&["--config", p, "--listen", "127.0.0.1:7001"]).unwrap();
        assert_eq!(c.listen.port(), 7001);
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
    }
}
