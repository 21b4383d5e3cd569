//! Broker settings: defaults, then an optional TOML file (`--config`), then `STREAMBUS_*`
//! environment variables, then command-line flags — each overriding the one before.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// An invalid setting: names it, where its value came from, and why. The binary prints it on
/// one line and exits 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value that can't be used.
    #[error("invalid setting {setting}{origin}: {reason}")]
    Invalid {
        /// The setting's name (as a flag).
        setting: &'static str,
        /// Where the value came from.
        origin: Origin,
        /// What is wrong.
        reason: String,
    },
    /// The config file can't be read or parsed.
    #[error("config file {path}{at}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// ` line N (key)` when the problem is on a line, else empty.
        at: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            setting,
            origin: Origin::Flag,
            reason: reason.into(),
        }
    }
}

/// Where a setting's value came from, as an error message names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// A flag on the command line.
    #[default]
    Flag,
    /// An environment variable (its name).
    Env(String),
    /// A line of the `--config` file.
    File {
        /// The file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// The key on it.
        key: String,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Flag => Ok(()),
            Self::Env(var) => write!(f, " (from {var})"),
            Self::File { path, line, key } => {
                write!(f, " (from {} line {line}, {key})", path.display())
            }
        }
    }
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
#[command(
    name = "streambus-server",
    version,
    about = "The StreamBus broker",
    allow_negative_numbers = true
)]
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
    /// A partition's segment file is rolled past this size, 1 MiB to 1 TiB
    /// [default: 268435456].
    #[arg(long, env = "STREAMBUS_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Sealed segments older than this are deleted (like 7d or 12h); `off` keeps them
    /// [default: 7d].
    #[arg(long, env = "STREAMBUS_RETENTION_TIME")]
    pub retention_time: Option<String>,
    /// A partition keeps at most this many bytes, deleting its oldest sealed segments; `off`
    /// keeps all [default: off].
    #[arg(long, env = "STREAMBUS_RETENTION_BYTES")]
    pub retention_bytes: Option<String>,
    /// How often retention looks for sealed segments to delete (like 60s or 5m)
    /// [default: 60s].
    #[arg(long, env = "STREAMBUS_RETENTION_CHECK_INTERVAL")]
    pub retention_check_interval: Option<String>,
    /// Cluster mode: the address to accept other brokers on (Raft and forwarded metadata
    /// writes; never clients); needs --peers [default: off, a single broker].
    #[arg(long, env = "STREAMBUS_CLUSTER_LISTEN")]
    pub cluster_listen: Option<String>,
    /// Cluster mode: every broker's cluster listener as ID=HOST:PORT, comma-separated (like
    /// 1=b1:9300,2=b2:9300,3=b3:9300), this broker's --node-id included; needs
    /// --cluster-listen [default: off, a single broker].
    #[arg(long, env = "STREAMBUS_PEERS")]
    pub peers: Option<String>,
    /// Cluster mode: mutual TLS on the cluster link with this certificate chain (PEM), valid
    /// for this broker's --peers host; needs --cluster-tls-key and --cluster-tls-ca
    /// [default: off, plaintext].
    #[arg(long, env = "STREAMBUS_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// The private key of --cluster-tls-cert (PEM).
    #[arg(long, env = "STREAMBUS_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs every broker's --cluster-tls-cert: a peer must present a
    /// certificate it signed, both ways.
    #[arg(long, env = "STREAMBUS_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
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
    segment_bytes: Option<u64>,
    retention_time: Option<String>,
    retention_bytes: Option<String>,
    retention_check_interval: Option<String>,
    cluster_listen: Option<String>,
    peers: Option<String>,
    cluster_tls_cert: Option<PathBuf>,
    cluster_tls_key: Option<PathBuf>,
    cluster_tls_ca: Option<PathBuf>,
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
    /// A partition's segment file is rolled past this size.
    pub segment_bytes: u64,
    /// Sealed segments older than this are deleted; `None` keeps them.
    pub retention_time: Option<Duration>,
    /// Bytes a partition keeps at most (oldest sealed segments deleted); `None` keeps all.
    pub retention_bytes: Option<u64>,
    /// How often retention runs.
    pub retention_check_interval: Duration,
    /// The `--config` file the settings were read from, if any.
    pub config_file: Option<PathBuf>,
    /// Cluster mode (`--cluster-listen` and `--peers`); `None`: a single broker.
    pub cluster: Option<ClusterSettings>,
}

/// The cluster settings: where this broker accepts other brokers and where they all are.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterSettings {
    /// The broker-to-broker listener (`--cluster-listen`).
    pub listen: SocketAddr,
    /// Every broker's cluster listener by node id, this one's included (`--peers`).
    pub peers: std::collections::BTreeMap<u32, Advertised>,
    /// Mutual TLS on the link (`--cluster-tls-*`); `None`: plaintext.
    pub tls: Option<ClusterTlsFiles>,
}

/// The PEM files of the cluster link's mutual TLS (`--cluster-tls-cert`, `--cluster-tls-key`,
/// `--cluster-tls-ca`): each broker presents its certificate both as a server and as a client,
/// and accepts only peers whose certificate the CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterTlsFiles {
    /// Certificate chain (`--cluster-tls-cert`).
    pub cert: PathBuf,
    /// Private key (`--cluster-tls-key`).
    pub key: PathBuf,
    /// The brokers' CA (`--cluster-tls-ca`).
    pub ca: PathBuf,
}

/// The rustls configurations of the cluster link: accepting peers, and connecting to them.
pub type LinkTlsConfigs = (
    std::sync::Arc<streambus_adapters::tls::rustls::ServerConfig>,
    std::sync::Arc<streambus_adapters::tls::rustls::ClientConfig>,
);

impl ClusterTlsFiles {
    /// Loads the files into the server and client configurations; the error names the setting
    /// at fault.
    pub fn load(&self) -> Result<LinkTlsConfigs, ConfigError> {
        use streambus_adapters::tls::{ServerFile, client_config, server_config};
        let server =
            server_config(&self.cert, &self.key, Some(&self.ca)).map_err(|(file, e)| {
                ConfigError::invalid(
                    match file {
                        ServerFile::Key => "--cluster-tls-key",
                        ServerFile::ClientCa => "--cluster-tls-ca",
                        _ => "--cluster-tls-cert",
                    },
                    e.to_string(),
                )
            })?;
        let client = client_config(Some(&self.ca), Some((&self.cert, &self.key)))
            .map_err(|e| ConfigError::invalid("--cluster-tls-cert", e.to_string()))?;
        Ok((server, client))
    }
}

impl ClusterSettings {
    /// Parses `--peers` (`ID=HOST:PORT,…`) for the broker `node_id`: ids unique, from 1 to
    /// 2147483647, and `node_id` among them.
    pub fn parse_peers(
        v: &str,
        node_id: u32,
    ) -> Result<std::collections::BTreeMap<u32, Advertised>, ConfigError> {
        let mut peers = std::collections::BTreeMap::new();
        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((id, address)) = item.split_once('=') else {
                return Err(ConfigError::invalid(
                    "--peers",
                    format!("{item:?} is not ID=HOST:PORT (like 1=broker1:9300)"),
                ));
            };
            let id = match id.trim().parse::<u32>() {
                Ok(id) if id > 0 && i32::try_from(id).is_ok() => id,
                _ => {
                    return Err(ConfigError::invalid(
                        "--peers",
                        format!("{:?} is not a node id from 1 to 2147483647", id.trim()),
                    ));
                }
            };
            let address = Advertised::parse("--peers", address.trim())?;
            if peers.insert(id, address).is_some() {
                return Err(ConfigError::invalid(
                    "--peers",
                    format!("node id {id} is listed twice"),
                ));
            }
        }
        if peers.is_empty() {
            return Err(ConfigError::invalid(
                "--peers",
                "is empty: list every broker as ID=HOST:PORT",
            ));
        }
        if !peers.contains_key(&node_id) {
            let ids: Vec<String> = peers.keys().map(u32::to_string).collect();
            return Err(ConfigError::invalid(
                "--peers",
                format!(
                    "this broker's --node-id {node_id} is not among the peers ({})",
                    ids.join(", ")
                ),
            ));
        }
        Ok(peers)
    }
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
            ConfigError::invalid(
                match file {
                    ServerFile::Key => "--tls-key",
                    ServerFile::ClientCa => "--tls-client-ca",
                    _ => "--tls-cert",
                },
                e.to_string(),
            )
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
        let bad = |why: &str| {
            ConfigError::invalid(
                setting,
                format!("{v:?} is not an address like broker1.example.com:9092 ({why})"),
            )
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
            segment_bytes: 256 << 20,
            retention_time: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
            retention_check_interval: Duration::from_secs(60),
            config_file: None,
            cluster: None,
        }
    }
}

fn duration(setting: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v.trim()).map_err(|e| {
        ConfigError::invalid(
            setting,
            format!("{v:?} is not a duration like 500ms, 30s or 10m ({e})"),
        )
    })?;
    if d.is_zero() {
        return Err(ConfigError::invalid(setting, "must be greater than zero"));
    }
    Ok(d)
}

fn addr(setting: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        ConfigError::invalid(
            setting,
            format!("{v:?} is not an address like 127.0.0.1:9092"),
        )
    })
}

/// The smallest `--max-frame-bytes`.
const MIN_FRAME_BYTES: u32 = 1024;
/// The largest `--max-frame-bytes`: 1 GiB (a frame is held in memory whole).
const MAX_FRAME_BYTES: u32 = 1 << 30;
/// The smallest `--segment-bytes`: 1 MiB.
const MIN_SEGMENT_BYTES: u64 = 1 << 20;
/// The largest `--segment-bytes`: 1 TiB.
const MAX_SEGMENT_BYTES: u64 = 1 << 40;

/// Where each setting's value was taken from, so an error can name it: a flag, its
/// `STREAMBUS_*` variable, or a line of the config file.
struct Origins<'a> {
    /// The environment variable a command-line value came from, by setting id.
    env_of: &'a dyn Fn(&str) -> Option<String>,
    file: Option<(&'a Path, &'a str)>,
    picked: Vec<(&'static str, Origin)>,
}

impl Origins<'_> {
    /// The value of setting `id` (the flag's name with `_`): the command line's (flag or
    /// environment) if given, else the file's; remembers which.
    fn pick<T>(&mut self, id: &'static str, cli: Option<T>, file: Option<T>) -> Option<T> {
        let origin = if cli.is_some() {
            (self.env_of)(id).map_or(Origin::Flag, Origin::Env)
        } else if file.is_some() {
            match self.file {
                Some((path, text)) => Origin::File {
                    path: path.to_owned(),
                    line: key_line(text, id).unwrap_or(0),
                    key: id.to_owned(),
                },
                None => Origin::Flag,
            }
        } else {
            return None;
        };
        self.picked.push((id, origin));
        cli.or(file)
    }

    /// `e` naming where its setting's value came from.
    fn attach(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Invalid {
                setting, reason, ..
            } => {
                let id = setting.trim_start_matches('-').replace('-', "_");
                let origin = self
                    .picked
                    .iter()
                    .find(|(k, _)| *k == id)
                    .map_or(Origin::Flag, |(_, o)| o.clone());
                ConfigError::Invalid {
                    setting,
                    origin,
                    reason,
                }
            }
            other => other,
        }
    }
}

/// The line (from 1) of the config file that sets `key` at the top level.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

impl Config {
    /// Resolves the command line (with its environment) and the config file it names. Errors
    /// name the config file's line for a value from it, and otherwise the flag (see
    /// [`from_matches`](Self::from_matches) to name environment variables too).
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        Self::resolve(cli, &|_| None)
    }

    /// Resolves the command line `matches` (parsed by [`Cli`]'s command); an error names the
    /// `STREAMBUS_*` variable a bad value came from.
    pub fn from_matches(matches: &clap::ArgMatches) -> Result<Self, ConfigError> {
        use clap::{CommandFactory, FromArgMatches};
        let cli = Cli::from_arg_matches(matches)
            .map_err(|e| ConfigError::invalid("the command line", e.to_string()))?;
        let command = Cli::command();
        let env_of = |id: &str| -> Option<String> {
            if matches.value_source(id) != Some(clap::parser::ValueSource::EnvVariable) {
                return None;
            }
            command
                .get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .and_then(|a| a.get_env())
                .map(|v| v.to_string_lossy().into_owned())
        };
        Self::resolve(cli, &env_of)
    }

    fn resolve(cli: Cli, env_of: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let (file, text) = match &cli.config {
            Some(path) => read_file(path)?,
            None => (FileConfig::default(), String::new()),
        };
        let config_file = cli.config.clone();
        let mut o = Origins {
            env_of,
            file: config_file.as_deref().map(|p| (p, text.as_str())),
            picked: Vec::new(),
        };
        Self::resolve_with(cli, file, &mut o).map_err(|e| o.attach(e))
    }

    fn resolve_with(cli: Cli, file: FileConfig, o: &mut Origins<'_>) -> Result<Self, ConfigError> {
        let d = Config::default();
        let listen = match o.pick("listen", cli.listen, file.listen) {
            Some(v) => addr("--listen", &v)?,
            None => d.listen,
        };
        let metrics_listen = match o.pick("metrics_listen", cli.metrics_listen, file.metrics_listen)
        {
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            Some(v) => Some(addr("--metrics-listen", &v)?),
            None => d.metrics_listen,
        };
        let dur = |setting, v: Option<String>, default| match v {
            Some(v) => duration(setting, &v),
            None => Ok(default),
        };
        let max_frame_bytes = o
            .pick("max_frame_bytes", cli.max_frame_bytes, file.max_frame_bytes)
            .unwrap_or(d.max_frame_bytes);
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&max_frame_bytes) {
            return Err(ConfigError::invalid(
                "--max-frame-bytes",
                format!(
                    "{max_frame_bytes} is outside {MIN_FRAME_BYTES} to {MAX_FRAME_BYTES} (1 GiB)"
                ),
            ));
        }
        let max_connections = o
            .pick("max_connections", cli.max_connections, file.max_connections)
            .unwrap_or(d.max_connections);
        if max_connections == 0 {
            return Err(ConfigError::invalid(
                "--max-connections",
                "must be at least 1",
            ));
        }
        let max_buffered_bytes = o
            .pick(
                "max_buffered_bytes",
                cli.max_buffered_bytes,
                file.max_buffered_bytes,
            )
            .unwrap_or(d.max_buffered_bytes);
        // One frame of the largest size must fit, or it could never be received.
        let one_frame = 2 * (max_frame_bytes as usize + 4);
        if max_buffered_bytes < one_frame {
            return Err(ConfigError::invalid(
                "--max-buffered-bytes",
                format!(
                    "{max_buffered_bytes} cannot hold a frame of --max-frame-bytes {max_frame_bytes}: want at least {one_frame}"
                ),
            ));
        }
        let tls = match (
            o.pick("tls_cert", cli.tls_cert, file.tls_cert),
            o.pick("tls_key", cli.tls_key, file.tls_key),
            o.pick("tls_client_ca", cli.tls_client_ca, file.tls_client_ca),
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
                return Err(ConfigError::invalid(
                    "--tls-cert",
                    "missing: --tls-key and --tls-client-ca need a certificate",
                ));
            }
            (Some(_), None, _) => {
                return Err(ConfigError::invalid(
                    "--tls-key",
                    "missing: --tls-cert needs its private key",
                ));
            }
        };
        let advertise = match o.pick("advertise", cli.advertise, file.advertise) {
            Some(v) => Some(Advertised::parse("--advertise", &v)?),
            None => None,
        };
        let node_id = o
            .pick("node_id", cli.node_id, file.node_id)
            .unwrap_or(d.node_id);
        if i32::try_from(node_id).is_err() {
            return Err(ConfigError::invalid(
                "--node-id",
                format!("{node_id} is above the largest node id, 2147483647"),
            ));
        }
        let auth_file = o.pick("auth_file", cli.auth_file, file.auth_file);
        if let Some(path) = &auth_file {
            // Checked now, so a broken file stops the start with one line (exit 2).
            crate::auth::Policy::load(path)
                .map_err(|e| ConfigError::invalid("--auth-file", e.to_string()))?;
        }
        let max_producers_per_partition = match o.pick(
            "max_producers_per_partition",
            cli.max_producers_per_partition,
            file.max_producers_per_partition,
        ) {
            Some(n) => NonZeroUsize::new(n).ok_or_else(|| {
                ConfigError::invalid("--max-producers-per-partition", "must be at least 1")
            })?,
            None => d.max_producers_per_partition,
        };
        let segment_bytes = o
            .pick("segment_bytes", cli.segment_bytes, file.segment_bytes)
            .unwrap_or(d.segment_bytes);
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&segment_bytes) {
            return Err(ConfigError::invalid(
                "--segment-bytes",
                format!(
                    "{segment_bytes} is outside {MIN_SEGMENT_BYTES} (1 MiB) to {MAX_SEGMENT_BYTES} (1 TiB)"
                ),
            ));
        }
        let retention_time = match o.pick("retention_time", cli.retention_time, file.retention_time)
        {
            Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
            Some(v) => Some(duration("--retention-time", &v)?),
            None => d.retention_time,
        };
        let retention_bytes =
            match o.pick("retention_bytes", cli.retention_bytes, file.retention_bytes) {
                Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        return Err(ConfigError::invalid(
                            "--retention-bytes",
                            format!("{v:?} is not a byte count above 0 or `off`"),
                        ));
                    }
                },
                None => d.retention_bytes,
            };
        let retention_check_interval = match o.pick(
            "retention_check_interval",
            cli.retention_check_interval,
            file.retention_check_interval,
        ) {
            Some(v) => duration("--retention-check-interval", &v)?,
            None => d.retention_check_interval,
        };
        let cluster_tls = match (
            o.pick(
                "cluster_tls_cert",
                cli.cluster_tls_cert,
                file.cluster_tls_cert,
            ),
            o.pick("cluster_tls_key", cli.cluster_tls_key, file.cluster_tls_key),
            o.pick("cluster_tls_ca", cli.cluster_tls_ca, file.cluster_tls_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => {
                let files = ClusterTlsFiles { cert, key, ca };
                // Refused now, with the setting named, rather than at the first peer.
                files.load()?;
                Some(files)
            }
            (None, _, _) => {
                return Err(ConfigError::invalid(
                    "--cluster-tls-cert",
                    "missing: --cluster-tls-key and --cluster-tls-ca need this broker's certificate",
                ));
            }
            (_, None, _) => {
                return Err(ConfigError::invalid(
                    "--cluster-tls-key",
                    "missing: --cluster-tls-cert needs its private key",
                ));
            }
            (_, _, None) => {
                return Err(ConfigError::invalid(
                    "--cluster-tls-ca",
                    "missing: the cluster link's TLS is mutual: give the CA that signs every broker's certificate",
                ));
            }
        };
        let cluster = match (
            o.pick("cluster_listen", cli.cluster_listen, file.cluster_listen),
            o.pick("peers", cli.peers, file.peers),
        ) {
            (None, None) => {
                if cluster_tls.is_some() {
                    return Err(ConfigError::invalid(
                        "--cluster-tls-cert",
                        "the cluster link's TLS needs cluster mode (--cluster-listen and --peers)",
                    ));
                }
                None
            }
            (Some(l), Some(p)) => {
                let listen = addr("--cluster-listen", &l)?;
                let peers = ClusterSettings::parse_peers(&p, node_id)?;
                Some(ClusterSettings {
                    listen,
                    peers,
                    tls: cluster_tls,
                })
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "--peers",
                    "missing: --cluster-listen needs the list of brokers (ID=HOST:PORT,...)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "--cluster-listen",
                    "missing: --peers needs this broker's cluster listener address",
                ));
            }
        };
        Ok(Self {
            cluster,
            tls,
            listen,
            data_dir: o
                .pick("data_dir", cli.data_dir, file.data_dir)
                .unwrap_or(d.data_dir),
            fsync: o.pick("fsync", cli.fsync, file.fsync).unwrap_or(d.fsync),
            fsync_interval: dur(
                "--fsync-interval",
                o.pick("fsync_interval", cli.fsync_interval, file.fsync_interval),
                d.fsync_interval,
            )?,
            max_connections,
            max_frame_bytes,
            read_timeout: dur(
                "--read-timeout",
                o.pick("read_timeout", cli.read_timeout, file.read_timeout),
                d.read_timeout,
            )?,
            write_timeout: dur(
                "--write-timeout",
                o.pick("write_timeout", cli.write_timeout, file.write_timeout),
                d.write_timeout,
            )?,
            idle_timeout: dur(
                "--idle-timeout",
                o.pick("idle_timeout", cli.idle_timeout, file.idle_timeout),
                d.idle_timeout,
            )?,
            max_fetch_wait: dur(
                "--max-fetch-wait",
                o.pick("max_fetch_wait", cli.max_fetch_wait, file.max_fetch_wait),
                d.max_fetch_wait,
            )?,
            max_buffered_bytes,
            auto_create_topics: o
                .pick(
                    "auto_create_topics",
                    cli.auto_create_topics,
                    file.auto_create_topics,
                )
                .unwrap_or(d.auto_create_topics),
            metrics_listen,
            runtime: o
                .pick("runtime", cli.runtime, file.runtime)
                .unwrap_or(d.runtime),
            advertise,
            node_id,
            auth_file,
            max_producers_per_partition,
            segment_bytes,
            retention_time,
            retention_bytes,
            retention_check_interval,
            config_file: cli.config,
        })
    }
}

/// Reads the config file: its settings and its text (for line numbers in errors).
fn read_file(path: &Path) -> Result<(FileConfig, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        at: String::new(),
        reason: e.to_string(),
    })?;
    let file = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let line = text
                    .get(..span.start)
                    .map_or(0, |b| b.matches('\n').count())
                    + 1;
                let key = text
                    .lines()
                    .nth(line - 1)
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim().to_owned())
                    .filter(|k| !k.is_empty());
                match key {
                    Some(k) => format!(" line {line} ({k})"),
                    None => format!(" line {line}"),
                }
            })
            .unwrap_or_default();
        ConfigError::File {
            path: path.to_owned(),
            at,
            reason: e.message().to_owned(),
        }
    })?;
    Ok((file, text))
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
    fn retention_and_segment_settings() {
        let c = parse(&[
            "--retention-time",
            "12h",
            "--retention-bytes",
            "1000000",
            "--segment-bytes",
            "1048576",
        ])
        .unwrap();
        assert_eq!(c.retention_time, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(c.retention_bytes, Some(1_000_000));
        assert_eq!(c.segment_bytes, 1 << 20);
        let c = parse(&["--retention-check-interval", "2s"]).unwrap();
        assert_eq!(c.retention_check_interval, Duration::from_secs(2));
        assert_eq!(
            parse(&[]).unwrap().retention_check_interval,
            Duration::from_secs(60)
        );
        let e = parse(&["--retention-check-interval", "0s"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting --retention-check-interval: must be greater than zero"
        );
        let c = parse(&["--retention-time", "off", "--retention-bytes", "OFF"]).unwrap();
        assert_eq!((c.retention_time, c.retention_bytes), (None, None));
        let d = parse(&[]).unwrap();
        assert_eq!(d.retention_time, Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!((d.retention_bytes, d.segment_bytes), (None, 256 << 20));
        let e = parse(&["--retention-bytes", "0"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid setting --retention-bytes: \"0\" is not a byte count above 0 or `off`"
        );
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
    fn cluster_tls_settings_are_all_three_and_need_cluster_mode() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk = junk.to_str().unwrap();
        let cluster = [
            "--node-id",
            "1",
            "--cluster-listen",
            "127.0.0.1:0",
            "--peers",
            "1=127.0.0.1:7001",
        ];
        let with = |tls: &[&str]| {
            let mut args = cluster.to_vec();
            args.extend_from_slice(tls);
            parse(&args).unwrap_err().to_string()
        };
        assert_eq!(
            with(&["--cluster-tls-cert", junk]),
            "invalid setting --cluster-tls-key: missing: --cluster-tls-cert needs its private key"
        );
        assert_eq!(
            with(&["--cluster-tls-cert", junk, "--cluster-tls-key", junk]),
            "invalid setting --cluster-tls-ca: missing: the cluster link's TLS is mutual: give the CA that signs every broker's certificate"
        );
        assert_eq!(
            with(&["--cluster-tls-ca", junk]),
            "invalid setting --cluster-tls-cert: missing: --cluster-tls-key and --cluster-tls-ca need this broker's certificate"
        );
        let e = with(&[
            "--cluster-tls-cert",
            junk,
            "--cluster-tls-key",
            junk,
            "--cluster-tls-ca",
            junk,
        ]);
        assert!(
            e.starts_with(&format!("invalid setting --cluster-tls-cert: {junk}: ")),
            "{e}"
        );
        let e = parse(&[
            "--cluster-tls-cert",
            junk,
            "--cluster-tls-key",
            junk,
            "--cluster-tls-ca",
            junk,
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("invalid setting --cluster-tls-cert: ") || e.contains("cluster mode"),
            "{e}"
        );
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
    fn cluster_settings_from_flags_and_file() {
        assert_eq!(parse(&[]).unwrap().cluster, None);
        let c = parse(&[
            "--node-id",
            "2",
            "--cluster-listen",
            "127.0.0.1:9302",
            "--peers",
            "1=b1.example:9301, 2=127.0.0.1:9302,3=[::1]:9303",
        ])
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.listen.to_string(), "127.0.0.1:9302");
        let peers: Vec<(u32, String)> = cluster
            .peers
            .iter()
            .map(|(id, a)| (*id, a.to_string()))
            .collect();
        assert_eq!(
            peers,
            [
                (1, "b1.example:9301".to_owned()),
                (2, "127.0.0.1:9302".to_owned()),
                (3, "[::1]:9303".to_owned())
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sb.toml");
        std::fs::write(
            &path,
            "node_id = 1\ncluster_listen = \"127.0.0.1:9301\"\npeers = \"1=127.0.0.1:9301\"\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.cluster.unwrap().peers.len(), 1);
        let e = parse(&["--cluster-listen", "127.0.0.1:1", "--peers", ""])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid setting --peers: is empty: list every broker as ID=HOST:PORT"
        );
        let e = parse(&["--cluster-listen", "127.0.0.1:1", "--peers", "1"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid setting --peers: \"1\" is not ID=HOST:PORT (like 1=broker1:9300)"
        );
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
