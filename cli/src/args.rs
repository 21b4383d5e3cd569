//! The command line: every subcommand, flag and its help text (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::format::Template;

const EXAMPLES: &str = "\
Examples:
  streambus topics create orders --partitions 3
  printf 'hello\\nworld\\n' | streambus produce orders --key customer-7
  streambus consume orders --from earliest --format '{partition}/{offset} {key} {value}'
  streambus consume orders --from latest --follow --json
  streambus offsets orders
  streambus cluster status
  streambus bench produce --messages 100000 --size 100
  streambus auth new-token ingest

Exit status: 0 success, 1 a runtime error (one line on stderr naming what failed),
2 a usage error.";

/// The StreamBus command-line tool: manage topics, produce and consume records, check a
/// broker.
#[derive(Debug, Parser)]
#[command(
    name = "streambus",
    version,
    after_help = EXAMPLES,
    propagate_version = true,
    max_term_width = 100
)]
pub(crate) struct Cli {
    /// The broker's address, or a comma-separated list of them (the first that answers is
    /// used)
    #[arg(
        long,
        short = 'b',
        global = true,
        env = "STREAMBUS_BROKER",
        hide_env_values = true,
        value_name = "HOST:PORT[,…]",
        default_value = "127.0.0.1:9092"
    )]
    pub(crate) broker: String,

    /// The token to authenticate with, when the broker requires one
    #[arg(
        long,
        global = true,
        env = "STREAMBUS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,

    /// Time allowed to connect and for each request (like 500ms, 10s, 2m)
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,

    /// Connect over TLS, trusting the system's CA certificates unless --tls-ca names others
    #[arg(long, global = true, env = "STREAMBUS_TLS")]
    pub(crate) tls: bool,

    /// Trust the CA certificates in this PEM file (implies --tls)
    #[arg(long, global = true, env = "STREAMBUS_TLS_CA", value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,

    /// Present this client certificate chain (PEM), for a broker that requires one (implies
    /// --tls; needs --tls-key)
    #[arg(
        long,
        global = true,
        env = "STREAMBUS_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub(crate) tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM)
    #[arg(
        long,
        global = true,
        env = "STREAMBUS_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub(crate) tls_key: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// The TLS settings the flags ask for (`None`: plaintext).
    pub(crate) fn tls(&self) -> Option<streambus_client::TlsOptions> {
        if !self.tls && self.tls_ca.is_none() && self.tls_cert.is_none() {
            return None;
        }
        let mut o = streambus_client::TlsOptions::default();
        o.ca_file.clone_from(&self.tls_ca);
        o.client_cert = self.tls_cert.clone().zip(self.tls_key.clone());
        Some(o)
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create, delete, list and describe topics
    #[command(subcommand)]
    Topics(Topics),
    /// Send records: one per line of standard input (or of --file)
    #[command(after_help = "\
Each line (without its line ending) is one record's value; the bytes are sent as they are.
Records are batched; a summary goes to stderr when all are acknowledged, and with --verbose
each record's `PARTITION OFFSET` to stdout, in input order. Ctrl-C stops reading and sends
what was read.")]
    Produce(Produce),
    /// Print a topic's records; with --follow, wait for new ones until Ctrl-C
    #[command(after_help = "\
Without --follow, prints the records stored when it starts (from --from) and exits.
Template fields: {topic} {partition} {offset} {timestamp} (Unix ns) {key} {value}
{headers} (k=v,k=v); `{{` and `}}` are literal braces, \\t and \\n a tab and a newline.
Keys, values and headers are written as raw bytes. With --json, each record is one JSON
object per line; a key, value or header that is not UTF-8 is base64 in a field named
`key_base64`, `value_base64` (the field's name with `_base64`).")]
    Consume(Consume),
    /// Show each partition's start and end offsets
    Offsets(Offsets),
    /// Check the broker's health (exit status 1 when unhealthy or unreachable)
    Health(Health),
    /// Measure throughput and latency: through the SDK, or raw against the broker
    #[command(after_help = "\
produce: the SDK's batching producer sends --messages records of --size bytes (or for
--duration); latency is from enqueue to acknowledgement.
roundtrip: the same with one record in flight per client (Producer::send, awaited); latency is
that of each send.
consume: the SDK's consumer reads --messages records from the topic's start (by default all
it holds); latency is that of each poll that returned records.
Raw modes (the protocol through the core's driver, no SDK):
requests: --request health (HealthCheck: the broker's request rate without storage) or produce
(one --size record each), --in-flight at a time on each of --connections connections;
--messages counts requests.
pingpong: TCP round trips of a one-record Produce's and its reply's sizes between two tasks of
this process, no broker: the floor under roundtrip.
pipeline: Produce requests of --batch records, --in-flight at a time on each of --connections
connections (--messages rounded up to whole requests); latency is that of each request.
fetch: Fetches of --max-bytes from partition 0, start to end and around again (64 MiB of
--size records are stored first when it is empty; 5 s unless --duration or --messages).
connections: opens --connections connections, each answering one HealthCheck; with
--server-pid (or --metrics), the broker's resident memory per connection; --hold keeps them
open.
longpoll: a consumer long-polls (--max-wait-ms, MinBytes 1) while a producer sends one --size
record at a time after a --gap; latency from the send to the consumer holding the record; sync
Produce phases in the same --rounds give the ratio.
trickle: --connections connections each send --send-bytes of a --frame-bytes Produce and stall;
reports the broker's peak RSS (--server-pid) and a fresh connection's HealthCheck time
(plaintext only).
handshakes: fresh connections, one HealthCheck each, from --connections threads for --duration
(5 s): connections per second (with --tls*: full TLS handshakes, no resumption); with
--server-pid, per second of the broker's CPU time.
producers: --messages distinct idempotent producers each send one one-record batch to
partition 0, --in-flight at a time on one connection; with --server-pid, the broker's
resident memory before and after (it keeps --max-producers-per-partition of them).
With --idempotence true, pipeline and requests --request produce send as one idempotent
producer per connection. Raw modes use --tls* and --token as the other commands do.
--plot FILE.svg|FILE.png draws the latency by percentile.
A progress bar is drawn on a terminal only. At the end: messages/s, MB/s (10^6 bytes of
record values) and latency p50/p90/p99/p99.9/max; --json prints them as one JSON object.")]
    Bench(Bench),
    /// Make tokens for the broker's --auth-file (no broker needed)
    #[command(subcommand)]
    Auth(Auth),
    /// Show the cluster: its brokers and each partition's leader and replicas
    #[command(subcommand)]
    Cluster(Cluster),
}

/// `streambus cluster …`.
#[derive(Debug, Subcommand)]
pub(crate) enum Cluster {
    /// The brokers (node id, client address) and, per topic and partition, the leader and
    /// the replicas, from the broker's Metadata (a single broker shows itself leading
    /// everything)
    Status {
        /// Print one JSON object instead of tables
        #[arg(long)]
        json: bool,
        /// The brokers' metrics endpoints (HOST:PORT, comma-separated): adds each replica's
        /// lag behind its leader, in records (the leader's log end offset minus the
        /// replica's), read from their `/metrics`
        #[arg(long, value_name = "HOST:PORT[,…]", value_delimiter = ',')]
        metrics: Vec<String>,
    },
}

/// `streambus auth …`.
#[derive(Debug, Subcommand)]
pub(crate) enum Auth {
    /// Print a fresh 256-bit token (line 1) and its line for the auth file's principals
    /// table (line 2, holding the token's SHA-256, never the token)
    NewToken {
        /// The principal the token is for
        principal: String,
    },
}

/// `streambus topics …`.
#[derive(Debug, Subcommand)]
pub(crate) enum Topics {
    /// Create a topic (succeeds if it exists with the same partition count)
    Create {
        /// The topic's name: 1-249 bytes of [A-Za-z0-9._-]
        name: String,
        /// Its partition count (1-1024)
        #[arg(long, short, default_value_t = 1, value_name = "N")]
        partitions: u32,
        /// Copies of each partition on distinct brokers of a cluster (0: the broker's
        /// default; a single broker takes 0 or 1)
        #[arg(long, short, default_value_t = 0, value_name = "R")]
        replication_factor: u16,
    },
    /// Delete a topic and its records
    Delete {
        /// The topic's name
        name: String,
    },
    /// List the topics with their partition counts
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show a topic's partitions with their start and end offsets, leaders and replicas
    Describe {
        /// The topic's name
        name: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// `streambus produce …`.
#[derive(Debug, Args)]
pub(crate) struct Produce {
    /// The topic (created with one partition if missing and the broker auto-creates topics)
    pub(crate) topic: String,
    /// Read the records from this file instead of standard input
    #[arg(long, short, value_name = "PATH")]
    pub(crate) file: Option<PathBuf>,
    /// The key of every record (records with one key go to one partition)
    #[arg(long, short)]
    pub(crate) key: Option<String>,
    /// A header of every record, as KEY=VALUE; repeat for more
    #[arg(long = "header", short = 'H', value_name = "KEY=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    /// Send every record to this partition (default: by key hash, or round robin)
    #[arg(long, short, value_name = "N")]
    pub(crate) partition: Option<u32>,
    /// Print each record's partition and offset
    #[arg(long, short)]
    pub(crate) verbose: bool,
}

/// `streambus consume …`.
#[derive(Debug, Args)]
pub(crate) struct Consume {
    /// The topic
    pub(crate) topic: String,
    /// Where to start: earliest, latest or an offset (with several partitions, each starts
    /// as near that offset as it can)
    #[arg(
        long,
        default_value = "earliest",
        value_name = "earliest|latest|OFFSET",
        value_parser = parse_from,
        allow_negative_numbers = true
    )]
    pub(crate) from: From,
    /// Read only this partition (default: all)
    #[arg(long, short, value_name = "N")]
    pub(crate) partition: Option<u32>,
    /// Stop after this many records
    #[arg(long, short = 'n', value_name = "N", value_parser = parse_count)]
    pub(crate) count: Option<u64>,
    /// Keep waiting for new records (long poll) until Ctrl-C or --count
    #[arg(long, short)]
    pub(crate) follow: bool,
    /// Output template for each record
    #[arg(long, default_value = "{value}", value_name = "TEMPLATE", value_parser = Template::parse, conflicts_with = "json")]
    pub(crate) format: Template,
    /// Print each record as a JSON object on its own line
    #[arg(long)]
    pub(crate) json: bool,
}

/// `streambus offsets …`.
#[derive(Debug, Args)]
pub(crate) struct Offsets {
    /// The topic
    pub(crate) topic: String,
    /// Only this partition
    #[arg(long, short, value_name = "N")]
    pub(crate) partition: Option<u32>,
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

/// `streambus bench`.
#[derive(Debug, Args)]
pub(crate) struct Bench {
    /// What to measure
    #[arg(value_enum, value_name = "MODE")]
    pub(crate) mode: BenchMode,
    /// The topic (created if missing)
    #[arg(long, short, default_value = "bench")]
    pub(crate) topic: String,
    /// Partitions of the topic when it is created
    #[arg(long, short, default_value_t = 1, value_name = "N")]
    pub(crate) partitions: u32,
    /// Records to send or read (default: 1000000 to produce, 100000 round trips, all stored
    /// to consume)
    #[arg(long, short = 'n', value_name = "N", value_parser = parse_count)]
    pub(crate) messages: Option<u64>,
    /// Stop after this long instead (like 10s)
    #[arg(long, short, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Bytes of each record's value
    #[arg(long, short, default_value_t = 100, value_name = "BYTES")]
    pub(crate) size: usize,
    /// How long a producer batch waits for more records
    #[arg(long, default_value = "5ms", value_name = "DURATION", value_parser = parse_duration_or_zero)]
    pub(crate) linger: Duration,
    /// Record bytes per producer batch at most
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub(crate) batch_bytes: usize,
    /// Clients (each with its own connections and producer) sharing the records to send
    #[arg(long, short, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) clients: u32,
    /// requests, pipeline, connections, trickle: connections to the broker; handshakes:
    /// threads opening them
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) connections: u32,
    /// The broker's metrics address (its --metrics-listen): pipeline and requests report the
    /// fsyncs it did meanwhile; connections, trickle and producers read its memory there when
    /// --server-pid is not given
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metrics: Option<String>,
    /// requests: what each request is
    #[arg(long, value_enum, default_value_t = RequestKind::Health, value_name = "KIND")]
    pub(crate) request: RequestKind,
    /// pipeline: messages per Produce request
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) batch: u32,
    /// fetch: MaxBytes of each Fetch
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub(crate) max_bytes: u32,
    /// connections, trickle, producers: the broker's process id, to report its memory;
    /// handshakes: its CPU time
    #[arg(long, value_name = "PID")]
    pub(crate) server_pid: Option<u32>,
    /// connections: spread them over this many source addresses, 127.0.0.FIRST onwards (one
    /// source address reaches about 28 000 connections to one listener)
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub(crate) sources: u8,
    /// connections: the last byte of the first source address (see --sources)
    #[arg(long, default_value_t = 1, value_name = "BYTE")]
    pub(crate) first_source: u8,
    /// connections: keep them open this long after the report, which ends with a line
    /// "ready: holding …" (like 30s)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) hold: Option<Duration>,
    /// longpoll: MaxWaitMs of each Fetch (MinBytes is 1)
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub(crate) max_wait_ms: u32,
    /// longpoll: pause between the Fetch and the Produce, so the Fetch waits at the broker
    #[arg(long, default_value = "1ms", value_name = "DURATION", value_parser = parse_duration_or_zero)]
    pub(crate) gap: Duration,
    /// longpoll: rounds of (sync phase, long-poll phase) sharing --duration (6 s)
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub(crate) rounds: u32,
    /// trickle: the size of the Produce frame each connection starts
    #[arg(long, default_value_t = 10 << 20, value_name = "BYTES")]
    pub(crate) frame_bytes: usize,
    /// trickle: the bytes of it each connection sends
    #[arg(long, default_value_t = 9 << 20, value_name = "BYTES")]
    pub(crate) send_bytes: usize,
    /// requests, pipeline, producers: requests in flight per connection (1-128)
    #[arg(long, default_value_t = 64, value_name = "M", value_parser = clap::value_parser!(u32).range(1..=128))]
    pub(crate) in_flight: u32,
    /// Idempotent produce (protocol §6.2): on by default for produce and roundtrip (the SDK's
    /// default), off by default for pipeline and requests --request produce (one producer per
    /// connection, consecutive sequences)
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(crate) idempotence: Option<bool>,
    /// Print the results as one JSON object
    #[arg(long)]
    pub(crate) json: bool,
    /// Also draw the latency by percentile into this chart (.svg or .png)
    #[arg(long, value_name = "FILE", value_parser = crate::plot::parse_path)]
    pub(crate) plot: Option<PathBuf>,
}

/// What `bench` measures (explained in `bench --help`'s text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BenchMode {
    // The SDK's batching producer.
    Produce,
    // One record in flight per client.
    Roundtrip,
    // The SDK's consumer, from the topic's start.
    Consume,
    // Health checks, many in flight.
    Requests,
    // Raw TCP round trips of a Produce's size inside this process: the floor.
    Pingpong,
    // Raw Produce requests, many in flight.
    Pipeline,
    // Raw Fetch requests, one in flight.
    Fetch,
    // Open and hold connections.
    Connections,
    // Produce to long-polling consumer latency.
    Longpoll,
    // Connections that send part of a large frame and stall.
    Trickle,
    // Fresh connections (TLS: full handshakes), one HealthCheck each.
    Handshakes,
    // Many distinct idempotent producers, one batch each.
    Producers,
}

/// The request `bench requests` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RequestKind {
    /// HealthCheck: the broker's request path without storage.
    Health,
    /// A Produce of one --size record.
    Produce,
}

/// `streambus health`.
#[derive(Debug, Args)]
pub(crate) struct Health {
    /// Print JSON instead of a sentence
    #[arg(long)]
    pub(crate) json: bool,
}

/// Where `consume` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum From {
    /// The first stored offset.
    Earliest,
    /// The end: only records produced from now on.
    Latest,
    /// This offset.
    At(i64),
}

fn parse_from(s: &str) -> Result<From, String> {
    match s {
        "earliest" => Ok(From::Earliest),
        "latest" => Ok(From::Latest),
        _ => match s.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(From::At(n)),
            _ => Err("expected earliest, latest or an offset (0 or more)".into()),
        },
    }
}

fn parse_count(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a count of 1 or more".into()),
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected KEY=VALUE with a non-empty KEY".into()),
    }
}

/// A duration that may be zero.
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Err(e) if e == ZERO => Ok(Duration::ZERO),
        other => other,
    }
}

const ZERO: &str = "must be greater than zero";

/// `500ms`, `10s`, `2m`, or a number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 10s or 2m, got {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s or m")),
    };
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(ZERO.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_duration_or_zero("0ms"), Ok(Duration::ZERO));
        assert!(parse_duration_or_zero("-1ms").is_err());
    }

    #[test]
    fn from_and_headers() {
        assert_eq!(parse_from("latest"), Ok(From::Latest));
        assert_eq!(parse_from("42"), Ok(From::At(42)));
        assert!(parse_from("-1").is_err());
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }
}
