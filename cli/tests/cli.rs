//! The `streambus` binary against a broker started in this process: every subcommand's
//! output, exit status and error line.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use assert_cmd::cargo::cargo_bin;
use serde_json::Value;

/// A broker on a free port with its own data directory, stopped when dropped.
struct Broker {
    running: streambus_server::Running,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Self {
        Self::with(None, |_| {})
    }

    /// A broker requiring authentication with the auth file `text`.
    fn start_with_auth(text: Option<&str>) -> Self {
        Self::with(text, |_| {})
    }

    /// A broker with the auth file `text` (if any) and settings changed by `f`.
    fn with(text: Option<&str>, f: impl FnOnce(&mut streambus_server::Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut c = streambus_server::Config::default();
        if let Some(text) = text {
            let path = dir.path().join("auth.toml");
            std::fs::write(&path, text).expect("write the auth file");
            c.auth_file = Some(path);
        }
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.data_dir = dir.path().join("data");
        c.metrics_listen = None;
        c.fsync = streambus_server::FsyncMode::Never;
        f(&mut c);
        let running = streambus_server::start(c).expect("broker starts");
        Self { running, _dir: dir }
    }

    fn addr(&self) -> String {
        self.running.addr().to_string()
    }

    /// `streambus` pointed at this broker through `STREAMBUS_BROKER`.
    fn cli(&self) -> Command {
        cli_at(&self.addr())
    }
}

fn cli_at(addr: &str) -> Command {
    let mut c = Command::new(cargo_bin!("streambus"));
    c.env("STREAMBUS_BROKER", addr)
        .timeout(Duration::from_secs(60));
    c
}

/// An address nobody listens on.
fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a.to_string()
}

fn stdout(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(a.get_output().stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(a.get_output().stderr.clone()).expect("UTF-8 stderr")
}

/// Runs `args`, expects `code` and, on stderr, exactly `line` (one line).
fn fails_with(cmd: &mut Command, args: &[&str], code: i32, line: &str) {
    let a = cmd.args(args).assert().code(code).stdout("");
    assert_eq!(stderr(&a), format!("{line}\n"), "streambus {args:?}");
}

#[test]
fn help_lists_the_commands_and_exits_0() {
    let a = cli_at("127.0.0.1:9").arg("--help").assert().success();
    let out = stdout(&a);
    for word in [
        "Usage: streambus [OPTIONS] <COMMAND>",
        "topics",
        "produce",
        "consume",
        "offsets",
        "health",
        "bench",
        "STREAMBUS_BROKER",
        "127.0.0.1:9092",
        "Exit status",
    ] {
        assert!(out.contains(word), "--help lacks {word:?}:\n{out}");
    }
    let a = cli_at("127.0.0.1:9")
        .args(["consume", "--help"])
        .assert()
        .success();
    assert!(stdout(&a).contains("--follow"));
    assert!(stdout(&a).contains("value_base64"));
    cli_at("127.0.0.1:9")
        .args(["topics", "create", "--help"])
        .assert()
        .success();
    let a = cli_at("127.0.0.1:9").arg("--version").assert().success();
    assert!(stdout(&a).starts_with("streambus "));
}

#[test]
fn topics_create_list_describe_delete() {
    let b = Broker::start();
    b.cli()
        .args(["topics", "list"])
        .assert()
        .success()
        .stdout("TOPIC  PARTITIONS\n");
    b.cli()
        .args(["topics", "create", "orders", "--partitions", "3"])
        .assert()
        .success()
        .stdout("created topic orders with 3 partitions\n");
    b.cli()
        .args(["topics", "create", "orders", "-p", "3"])
        .assert()
        .success()
        .stdout("topic orders already exists with 3 partitions\n");
    fails_with(
        &mut b.cli(),
        &["topics", "create", "orders", "--partitions", "2"],
        1,
        "error: create topic on topic \"orders\": the broker answered TopicExists (9): \
         topic orders already exists with 3 partitions",
    );
    b.cli()
        .args(["topics", "create", "a.log", "--replication-factor", "1"])
        .assert()
        .success()
        .stdout("created topic a.log with 1 partition\n");
    // A single broker keeps one copy: more is the broker's InvalidRequest, and nothing is made.
    fails_with(
        &mut b.cli(),
        &["topics", "create", "copies", "-r", "3"],
        1,
        "error: create topic on topic \"copies\": the broker answered InvalidRequest (2): \
         replication factor 3 is not supported: want 0 or 1",
    );
    b.cli()
        .args(["topics", "list"])
        .assert()
        .success()
        .stdout("TOPIC   PARTITIONS\na.log   1\norders  3\n");
    let a = b
        .cli()
        .args(["topics", "list", "--json"])
        .assert()
        .success();
    let v: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(
        v,
        serde_json::json!([
            { "name": "a.log", "partitions": 1 },
            { "name": "orders", "partitions": 3 }
        ])
    );

    b.cli()
        .args(["produce", "orders", "--partition", "1"])
        .write_stdin("x\ny\n")
        .assert()
        .success();
    b.cli()
        .args(["topics", "describe", "orders"])
        .assert()
        .success()
        .stdout(format!(
            "topic orders: 3 partitions, 2 records stored\n\
             PARTITION  START  END  RECORDS  LEADER  REPLICAS\n\
             0          0      0    0        0       0\n\
             1          0      2    2        0       0\n\
             2          0      0    0        0       0\n\
             broker 0 at {}\n",
            b.addr()
        ));
    let a = b
        .cli()
        .args(["topics", "describe", "orders", "--json"])
        .assert()
        .success();
    let v: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(v["name"], "orders");
    assert_eq!(
        v["partitions"][1],
        serde_json::json!({"partition": 1, "start": 0, "end": 2, "leader": 0, "replicas": [0]})
    );
    assert_eq!(
        v["brokers"],
        serde_json::json!([{"node_id": 0, "address": b.addr()}])
    );

    b.cli()
        .args(["topics", "delete", "orders"])
        .assert()
        .success()
        .stdout("deleted topic orders\n");
    fails_with(
        &mut b.cli(),
        &["topics", "delete", "orders"],
        1,
        "error: delete topic on topic \"orders\": the broker answered TopicNotFound (8): \
         topic orders does not exist",
    );
    b.cli()
        .args(["topics", "list"])
        .assert()
        .success()
        .stdout("TOPIC  PARTITIONS\na.log  1\n");
}

#[test]
fn produced_records_read_back_equal_with_keys_and_headers() {
    let b = Broker::start();
    b.cli()
        .args(["topics", "create", "events"])
        .assert()
        .success();
    let mut input = b"first\nsecond line\r\n\n".to_vec();
    input.extend_from_slice(b"\xff\xfe binary\n");
    input.extend_from_slice(b"no newline at the end");
    let a = b
        .cli()
        .args([
            "produce",
            "events",
            "--key",
            "customer-7",
            "--header",
            "trace=abc",
            "-H",
            "eq=a=b",
            "--verbose",
        ])
        .write_stdin(input)
        .assert()
        .success()
        .stdout("0 0\n0 1\n0 2\n0 3\n0 4\n");
    assert_eq!(
        stderr(&a),
        "produced 5 records to events (partition 0: offsets 0-4)\n"
    );

    let a = b
        .cli()
        .args(["consume", "events", "--count", "5", "--json"])
        .assert()
        .success();
    let lines: Vec<Value> = stdout(&a)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 5);
    let headers = serde_json::json!([
        { "key": "trace", "value": "abc" },
        { "key": "eq", "value": "a=b" }
    ]);
    for (i, (line, value)) in lines
        .iter()
        .zip(["first", "second line", "", "", "no newline at the end"])
        .enumerate()
    {
        assert_eq!(line["topic"], "events");
        assert_eq!(line["partition"], 0);
        assert_eq!(line["offset"], i);
        assert!(line["timestamp"].as_i64().is_some_and(|t| t > 0));
        assert_eq!(line["key"], "customer-7");
        assert_eq!(line["headers"], headers);
        if i == 3 {
            assert!(line.get("value").is_none(), "{line}");
            assert_eq!(line["value_base64"], "//4gYmluYXJ5");
        } else {
            assert_eq!(line["value"], value, "{line}");
        }
    }

    // The text template writes raw bytes.
    let a = b
        .cli()
        .args([
            "consume",
            "events",
            "--format",
            "{topic}/{partition}/{offset} {key} [{headers}] {{{value}}}",
        ])
        .assert()
        .success();
    let mut want = b"events/0/0 customer-7 [trace=abc,eq=a=b] {first}\n\
        events/0/1 customer-7 [trace=abc,eq=a=b] {second line}\n\
        events/0/2 customer-7 [trace=abc,eq=a=b] {}\n"
        .to_vec();
    want.extend_from_slice(b"events/0/3 customer-7 [trace=abc,eq=a=b] {\xff\xfe binary}\n");
    want.extend_from_slice(b"events/0/4 customer-7 [trace=abc,eq=a=b] {no newline at the end}\n");
    assert_eq!(a.get_output().stdout, want);
}

#[test]
fn produce_from_a_file_to_a_partition_and_consume_positions() {
    let b = Broker::start();
    b.cli()
        .args(["topics", "create", "t", "--partitions", "2"])
        .assert()
        .success();
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("records.txt");
    std::fs::write(&file, "r0\nr1\nr2\nr3\nr4\n").expect("write");
    let a = b
        .cli()
        .args(["produce", "t", "--partition", "1", "--file"])
        .arg(&file)
        .assert()
        .success()
        .stdout("");
    assert_eq!(
        stderr(&a),
        "produced 5 records to t (partition 1: offsets 0-4)\n"
    );

    let fmt = ["--format", "{partition}:{offset}:{value}"];
    b.cli()
        .args(["consume", "t"])
        .args(fmt)
        .assert()
        .success()
        .stdout("1:0:r0\n1:1:r1\n1:2:r2\n1:3:r3\n1:4:r4\n");
    b.cli()
        .args(["consume", "t", "-p", "1", "--from", "3"])
        .args(fmt)
        .assert()
        .success()
        .stdout("1:3:r3\n1:4:r4\n");
    b.cli()
        .args(["consume", "t", "--count", "2"])
        .args(fmt)
        .assert()
        .success()
        .stdout("1:0:r0\n1:1:r1\n");
    b.cli()
        .args(["consume", "t", "--from", "latest"])
        .assert()
        .success()
        .stdout("");
    b.cli()
        .args(["consume", "t", "-p", "0"])
        .assert()
        .success()
        .stdout("");
    fails_with(
        &mut b.cli(),
        &["consume", "t", "-p", "1", "--from", "9"],
        1,
        "error: offset 9 is out of range for partition 1 of t: it holds offsets 0 to 4",
    );
    fails_with(
        &mut b.cli(),
        &["consume", "t", "-p", "0", "--from", "1"],
        1,
        "error: offset 1 is out of range for partition 0 of t: it is empty, its next offset is 0",
    );
    fails_with(
        &mut b.cli(),
        &["produce", "t", "--file", "/nonexistent/records.txt"],
        1,
        "error: cannot open /nonexistent/records.txt: No such file or directory (os error 2)",
    );

    b.cli()
        .args(["offsets", "t"])
        .assert()
        .success()
        .stdout("PARTITION  START  END\n0          0      0\n1          0      5\n");
    b.cli()
        .args(["offsets", "t", "-p", "1"])
        .assert()
        .success()
        .stdout("PARTITION  START  END\n1          0      5\n");
    let a = b.cli().args(["offsets", "t", "--json"]).assert().success();
    let v: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(
        v,
        serde_json::json!([
            { "partition": 0, "start": 0, "end": 0 },
            { "partition": 1, "start": 0, "end": 5 }
        ])
    );
}

#[test]
fn health_of_a_live_broker() {
    let b = Broker::start();
    let a = b.cli().arg("health").assert().success();
    let out = stdout(&a);
    assert!(
        out.starts_with(&format!("broker {} is healthy (up ", b.addr())) && out.ends_with("s)\n"),
        "{out}"
    );
    let a = b.cli().args(["health", "--json"]).assert().success();
    let v: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(v["healthy"], true);
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["broker"], b.addr());
}

/// `--tls-ca` (and `--tls-cert`/`--tls-key` for mTLS) against a TLS broker; a CA file that
/// can't be read is a usage error naming it; a plaintext CLI against the TLS port fails.
#[test]
fn tls_flags_reach_a_tls_broker() {
    let pki = streambus_tests::tls::Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = streambus_tests::broker_config(dir.path(), streambus_server::RuntimeKind::Tokio);
    c.tls = Some(pki.broker_files(true));
    let b = streambus_server::start(c).expect("broker starts");
    let addr = format!("localhost:{}", b.addr().port());
    let path = |n: &str| pki.path(n).to_str().expect("UTF-8 path").to_owned();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client-key.pem"));
    let a = cli_at(&addr)
        .args([
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "health",
        ])
        .assert()
        .success();
    assert!(
        stdout(&a).starts_with(&format!("broker {addr} is healthy")),
        "{}",
        stdout(&a)
    );
    cli_at(&addr)
        .env("STREAMBUS_TLS_CA", &ca)
        .env("STREAMBUS_TLS_CERT", &cert)
        .env("STREAMBUS_TLS_KEY", &key)
        .args(["topics", "list"])
        .assert()
        .success();
    fails_with(
        &mut cli_at(&addr),
        &["--tls-ca", "/nonexistent/ca.pem", "health"],
        2,
        "error: invalid setting tls: /nonexistent/ca.pem: No such file or directory (os error 2)",
    );
    let a = cli_at(&addr)
        .args(["--tls-ca", &path("other-ca.pem"), "health"])
        .assert()
        .code(1);
    assert!(
        stderr(&a).contains("TLS: invalid peer certificate: UnknownIssuer"),
        "{}",
        stderr(&a)
    );
    // The raw modes connect over TLS too (mTLS here): a pipeline's records all land, and
    // every `handshakes` connection is answered.
    let tls = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let json = |args: &[&str]| -> Value {
        let a = cli_at(&addr).args(tls).args(args).assert().success();
        serde_json::from_str(&stdout(&a)).expect("one JSON object")
    };
    let p = json(&[
        "bench", "pipeline", "-t", "tls", "-n", "200", "--batch", "10", "--json",
    ]);
    assert_eq!(p["messages"], 200);
    let a = cli_at(&addr)
        .args(tls)
        .args(["offsets", "tls"])
        .assert()
        .success();
    assert_eq!(stdout(&a), "PARTITION  START  END\n0          0      200\n");
    let h = json(&[
        "bench",
        "handshakes",
        "-n",
        "5",
        "--connections",
        "2",
        "--json",
    ]);
    assert_eq!(h["messages"], 5);
    assert_eq!(h["latency_samples"], 5);
    assert_eq!(h["tls"], true);
    fails_with(
        &mut cli_at(&addr),
        &["--tls-ca", &ca, "bench", "trickle"],
        2,
        "error: bench trickle writes raw bytes on plaintext connections: it does not take --tls",
    );
}

/// `pipeline --idempotence true` sends as one idempotent producer per connection, and
/// `producers` as one producer per request: the broker's producer gauge counts exactly them,
/// and every record lands once.
#[test]
fn bench_idempotent_modes_send_as_the_producers_they_say() {
    let b = Broker::with(None, |c| {
        c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    });
    let metrics = b.running.metrics_addr().expect("metrics listener");
    let producers = || {
        streambus_tests::metric(metrics, "streambus_idempotent_producers")
            .expect("the producer gauge")
    };
    let json = |args: &[&str]| -> Value {
        let a = b.cli().args(args).assert().success();
        serde_json::from_str(&stdout(&a)).expect("one JSON object")
    };
    let plain = json(&[
        "bench", "pipeline", "-t", "plain", "-n", "100", "--batch", "10", "--json",
    ]);
    assert_eq!(plain["shape"]["idempotent"], false);
    assert_eq!(producers(), "0");
    let idem = [
        "bench",
        "pipeline",
        "-t",
        "idem",
        "-n",
        "1000",
        "--batch",
        "10",
        "--connections",
        "2",
        "--in-flight",
        "8",
        "--idempotence",
        "true",
        "--json",
    ];
    let p = json(&idem);
    assert_eq!(p["messages"], 1000);
    assert_eq!(p["shape"]["idempotent"], true);
    assert_eq!(producers(), "2");
    // A second run is two new producers, not retries of the first run's: 1000 more land.
    json(&idem);
    assert_eq!(producers(), "4");
    let a = b.cli().args(["offsets", "idem"]).assert().success();
    assert_eq!(
        stdout(&a),
        "PARTITION  START  END\n0          0      2000\n"
    );

    let p = json(&[
        "bench",
        "producers",
        "-t",
        "many",
        "-n",
        "300",
        "--in-flight",
        "8",
        "--json",
    ]);
    assert_eq!(p["mode"], "producers");
    assert_eq!(p["messages"], 300);
    assert_eq!(producers(), "304");
    let a = b.cli().args(["offsets", "many"]).assert().success();
    assert_eq!(stdout(&a), "PARTITION  START  END\n0          0      300\n");
}

#[test]
fn the_broker_flag_wins_over_the_environment() {
    let b = Broker::start();
    cli_at(&dead_addr())
        .args(["--broker", &b.addr(), "topics", "list"])
        .assert()
        .success();
    cli_at(&dead_addr())
        .args(["topics", "list", "-b", &b.addr()])
        .assert()
        .success();
}

/// `--broker A,B`: the first broker that answers is used; when none does, one line names each
/// and why, exit 1.
#[test]
fn a_broker_list_uses_the_first_that_answers() {
    let b = Broker::start();
    let (dead1, dead2) = (dead_addr(), dead_addr());
    let a = b
        .cli()
        .args(["-b", &format!("{dead1}, {}", b.addr()), "health"])
        .assert()
        .success();
    assert!(
        stdout(&a).starts_with(&format!("broker {} is healthy", b.addr())),
        "{}",
        stdout(&a)
    );
    let a = b
        .cli()
        .args(["-b", &format!("{dead1},{dead2}"), "health"])
        .assert()
        .code(1)
        .stdout("");
    let err = stderr(&a);
    assert!(
        err.starts_with(&format!("error: none of the 2 brokers answered: {dead1}: "))
            && err.contains(&format!("; {dead2}: "))
            && err.lines().count() == 1,
        "{err}"
    );
    fails_with(
        &mut b.cli(),
        &["-b", &format!("{dead1},nonsense"), "health"],
        2,
        "error: invalid --broker: \"nonsense\" is not host:port (like 127.0.0.1:9092)",
    );
}

#[test]
fn cluster_status_of_a_single_broker_shows_it_leading_every_partition() {
    let b = Broker::start();
    b.cli()
        .args(["cluster", "status"])
        .assert()
        .success()
        .stdout(format!(
            "BROKER  ADDRESS\n0       {}\nno topics\n",
            b.addr()
        ));
    b.cli()
        .args(["topics", "create", "orders", "-p", "2"])
        .assert()
        .success();
    b.cli()
        .args(["topics", "create", "a.log"])
        .assert()
        .success();
    b.cli()
        .args(["cluster", "status"])
        .assert()
        .success()
        .stdout(format!(
            "BROKER  ADDRESS\n\
             0       {}\n\
             \n\
             TOPIC   PARTITION  LEADER  REPLICAS\n\
             a.log   0          0       0\n\
             orders  0          0       0\n\
             orders  1          0       0\n",
            b.addr()
        ));
    let a = b
        .cli()
        .args(["cluster", "status", "--json"])
        .assert()
        .success();
    let v: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    let one = |p: u32| serde_json::json!({"partition": p, "leader": 0, "leader_epoch": 0, "replicas": [0]});
    assert_eq!(
        v,
        serde_json::json!({
            "brokers": [{"node_id": 0, "address": b.addr()}],
            "topics": [
                {"name": "a.log", "partitions": [one(0)]},
                {"name": "orders", "partitions": [one(0), one(1)]},
            ],
        })
    );
}

/// Three brokers of one cluster in this process, each on its own data directory.
fn start_cluster() -> (Vec<streambus_server::Running>, Vec<tempfile::TempDir>) {
    use clap::Parser as _;
    // Below the ephemeral range: a port 0 bind, dropped, could be taken by a connection's
    // local port before its broker binds it.
    let ports = streambus_tests::free_ports(3);
    let peers = format!(
        "1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let brokers = (0..3)
        .map(|i| {
            let data = dirs[i].path().display().to_string();
            let (id, listen) = ((i + 1).to_string(), format!("127.0.0.1:{}", ports[i]));
            let args = [
                "streambus-server",
                "--node-id",
                &id,
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                &data,
                "--fsync",
                "never",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cluster-listen",
                &listen,
                "--peers",
                &peers,
            ];
            let cli = streambus_server::Cli::try_parse_from(args).expect("arguments");
            let config = streambus_server::Config::from_cli(cli).expect("config");
            streambus_server::start(config).expect("broker starts")
        })
        .collect();
    (brokers, dirs)
}

/// Runs `streambus cluster status --json` at `addr` until `done` accepts its output (or fails
/// the test after 30 s).
fn status_until(addr: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    status_with_until(addr, &[], what, done)
}

/// [`status_until`] with `extra` arguments.
fn status_with_until(
    addr: &str,
    extra: &[&str],
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli_at(addr)
            .args(["cluster", "status", "--json"])
            .args(extra)
            .output()
            .expect("runs");
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
            if done(&v) {
                return v;
            }
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_status_of_three_brokers_names_each_partition_leader_and_describe_follows_them() {
    let (brokers, _dirs) = start_cluster();
    let addrs: Vec<String> = brokers.iter().map(|b| b.addr().to_string()).collect();
    for a in &addrs {
        status_until(a, "three brokers registered", |v| {
            v["brokers"].as_array().is_some_and(|b| b.len() == 3)
        });
    }
    cli_at(&addrs[1])
        .args(["topics", "create", "orders", "-p", "3", "-r", "3"])
        .assert()
        .success()
        .stdout("created topic orders with 3 partitions\n");
    // Each partition's Raft group elects its leader (LeaderEpoch: its term, from 1).
    let v = status_until(
        &addrs[2],
        "every partition of the topic led, on broker 3",
        |v| {
            v["topics"].as_array().is_some_and(|t| {
                t.len() == 1
                    && t[0]["partitions"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().all(|p| p["leader"].as_i64() >= Some(1)))
            })
        },
    );
    let leaders: Vec<u64> = v["topics"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["leader"].as_u64().unwrap())
        .collect();
    let placed = [[1, 2, 3], [2, 3, 1], [3, 1, 2]];
    for (p, (l, r)) in leaders.iter().zip(&placed).enumerate() {
        assert!(
            r.contains(&(*l as u32)),
            "partition {p}: leader {l} not among {r:?}"
        );
        assert!(v["topics"][0]["partitions"][p]["leader_epoch"].as_i64() >= Some(1));
    }
    let part = |p: usize| serde_json::json!({"partition": p, "leader": leaders[p], "leader_epoch": v["topics"][0]["partitions"][p]["leader_epoch"], "replicas": placed[p]});
    assert_eq!(
        v,
        serde_json::json!({
            "brokers": [
                {"node_id": 1, "address": addrs[0]},
                {"node_id": 2, "address": addrs[1]},
                {"node_id": 3, "address": addrs[2]},
            ],
            "topics": [{"name": "orders", "partitions": [part(0), part(1), part(2)]}],
        })
    );
    cli_at(&addrs[2])
        .args(["cluster", "status"])
        .assert()
        .success()
        .stdout(format!(
            "BROKER  ADDRESS\n\
             1       {}\n\
             2       {}\n\
             3       {}\n\
             \n\
             TOPIC   PARTITION  LEADER  REPLICAS\n\
             orders  0          {}       1,2,3\n\
             orders  1          {}       2,3,1\n\
             orders  2          {}       3,1,2\n",
            addrs[0], addrs[1], addrs[2], leaders[0], leaders[1], leaders[2]
        ));
    // Two records on partition 1 through its leader; broker 1 describes the topic with each
    // partition's offsets read from its leader.
    let leader1 = &addrs[leaders[1] as usize - 1];
    cli_at(leader1)
        .args(["produce", "orders", "--partition", "1"])
        .write_stdin("x\ny\n")
        .assert()
        .success();
    cli_at(&addrs[0])
        .args(["topics", "describe", "orders"])
        .assert()
        .success()
        .stdout(format!(
            "topic orders: 3 partitions, 2 records stored\n\
             PARTITION  START  END  RECORDS  LEADER  REPLICAS\n\
             0          0      0    0        {}       1,2,3\n\
             1          0      2    2        {}       2,3,1\n\
             2          0      0    0        {}       3,1,2\n\
             broker 1 at {}\n\
             broker 2 at {}\n\
             broker 3 at {}\n",
            leaders[0], leaders[1], leaders[2], addrs[0], addrs[1], addrs[2]
        ));
    // With the brokers' metrics: each replica's lag behind its leader, in records, once the
    // followers have the two records (0 everywhere).
    let metrics: Vec<String> = brokers
        .iter()
        .map(|b| b.metrics_addr().expect("metrics").to_string())
        .collect();
    let all = metrics.join(",");
    let v = status_with_until(
        &addrs[0],
        &["--metrics", &all],
        "every replica caught up",
        |v| {
            v["topics"][0]["partitions"].as_array().is_some_and(|ps| {
                ps.iter()
                    .all(|p| p["replica_lag"] == serde_json::json!([0, 0, 0]))
            })
        },
    );
    assert_eq!(
        v["topics"][0]["partitions"][1]["replicas"],
        serde_json::json!([2, 3, 1])
    );
    let table = cli_at(&addrs[0])
        .args(["cluster", "status", "--metrics", &all])
        .assert()
        .success();
    let out = String::from_utf8(table.get_output().stdout.clone()).unwrap();
    assert!(
        out.ends_with(&format!(
            "TOPIC   PARTITION  LEADER  REPLICAS  LAG\n\
             orders  0          {}       1,2,3     0,0,0\n\
             orders  1          {}       2,3,1     0,0,0\n\
             orders  2          {}       3,1,2     0,0,0\n",
            leaders[0], leaders[1], leaders[2]
        )),
        "{out}"
    );
    // Only broker 1's metrics: the others' lag is unknown, not guessed.
    let one = cli_at(&addrs[0])
        .args(["cluster", "status", "--json", "--metrics", &metrics[0]])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&one.stdout).unwrap();
    for (p, leader) in leaders.iter().enumerate() {
        let lag = &v["topics"][0]["partitions"][p]["replica_lag"];
        let known = lag
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| !l.is_null())
            .count();
        // Broker 1's own lag is known only where broker 1 leads (then it is 0).
        assert_eq!(known, usize::from(*leader == 1), "partition {p}: {lag}");
    }
    // An endpoint that does not answer: one line naming it, exit 1.
    let dead = dead_addr();
    let a = cli_at(&addrs[0])
        .args(["cluster", "status", "--metrics", &dead])
        .assert()
        .code(1)
        .stdout("");
    let err = stderr(&a);
    assert!(
        err.starts_with(&format!("error: --metrics {dead}: ")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_broker_that_is_down_is_one_line_and_exit_1() {
    let addr = dead_addr();
    let commands: [&[&str]; 11] = [
        &["topics", "create", "t"],
        &["topics", "delete", "t"],
        &["topics", "list"],
        &["topics", "describe", "t"],
        &["produce", "t"],
        &["consume", "t"],
        &["consume", "t", "--follow"],
        &["offsets", "t"],
        &["health"],
        &["cluster", "status"],
        &["cluster", "status", "--json"],
    ];
    for args in commands {
        let a = cli_at(&addr)
            .args(args)
            .write_stdin("a record\n")
            .assert()
            .code(1)
            .stdout("");
        let err = stderr(&a);
        assert!(
            err.starts_with(&format!("error: broker {addr}: connect: I/O error: ")),
            "streambus {args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "streambus {args:?}: {err}");
        assert!(err.ends_with('\n'));
    }
}

#[test]
fn unknown_topics_and_partitions_are_exit_1() {
    let b = Broker::start();
    for args in [
        &["topics", "describe", "nope"][..],
        &["consume", "nope"],
        &["consume", "nope", "--follow"],
        &["offsets", "nope"],
    ] {
        fails_with(&mut b.cli(), args, 1, "error: topic nope does not exist");
    }
    b.cli()
        .args(["topics", "create", "two", "-p", "2"])
        .assert()
        .success();
    for args in [
        &["consume", "two", "-p", "2"][..],
        &["offsets", "two", "--partition", "7"],
    ] {
        let p = args[args.len() - 1];
        fails_with(
            &mut b.cli(),
            args,
            1,
            &format!("error: topic two has no partition {p} (it has 2 partitions)"),
        );
    }
}

#[test]
fn bad_arguments_are_usage_errors_exit_2() {
    // Refused by the command line (clap): nothing is sent, the broker isn't needed.
    let addr = dead_addr();
    for args in [
        &[][..],
        &["bogus"],
        &["topics"],
        &["topics", "create"],
        &["topics", "create", "t", "--partitions", "many"],
        &["consume", "t", "--from", "-1"],
        &["consume", "t", "--from", "soon"],
        &["consume", "t", "--count", "0"],
        &["consume", "t", "--format", "{nope}"],
        &["consume", "t", "--format", "{value"],
        &["consume", "t", "--json", "--format", "{value}"],
        &["produce", "t", "--header", "novalue"],
        &["produce", "t", "--partition", "-1"],
        &["health", "--timeout", "0s"],
        &["health", "--nope"],
    ] {
        let a = cli_at(&addr).args(args).assert().code(2).stdout("");
        let err = stderr(&a);
        assert!(err.starts_with("error: "), "streambus {args:?}: {err}");
        assert!(!err.contains("panicked"), "streambus {args:?}: {err}");
    }
    fails_with(
        &mut cli_at(&addr),
        &["consume", "t", "--format", "{nope}"],
        2,
        "error: invalid value '{nope}' for '--format <TEMPLATE>': unknown field {nope}: use \
         {topic} {partition} {offset} {timestamp} {key} {value} {headers}\n\n\
         For more information, try '--help'.",
    );
    fails_with(
        &mut cli_at("nohost"),
        &["health"],
        2,
        "error: invalid STREAMBUS_BROKER: \"nohost\" is not host:port (like 127.0.0.1:9092)",
    );
    fails_with(
        &mut cli_at(&addr),
        &["health", "--broker", "host:port"],
        2,
        "error: invalid --broker: \"host:port\" is not host:port (like 127.0.0.1:9092)",
    );
    fails_with(
        &mut cli_at(""),
        &["topics", "list"],
        2,
        "error: invalid STREAMBUS_BROKER: \"\" is not host:port (like 127.0.0.1:9092)",
    );

    // Refused by the SDK before sending: also usage errors.
    let b = Broker::start();
    fails_with(
        &mut b.cli(),
        &["topics", "create", "bad name"],
        2,
        "error: create topic on topic \"bad name\": invalid input: topic name \"bad name\" is \
         invalid: 1-249 bytes of [A-Za-z0-9._-], not . or ..",
    );
    fails_with(
        &mut b.cli(),
        &["topics", "create", "t", "--partitions", "0"],
        2,
        "error: create topic on topic \"t\": invalid input: partition count must be 1..=1024, got 0",
    );
    let a = b
        .cli()
        .args(["produce", "t", "--partition", "3"])
        .write_stdin("a\n")
        .assert()
        .code(2)
        .stdout("");
    assert_eq!(
        stderr(&a),
        "error: line 1: produce on topic \"t\" partition 3: invalid input: partition 3 is out \
         of range: the topic has 1 (produced 0 records to t before it)\n"
    );
}

/// Reads `child`'s stdout lines into a channel.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("streambus did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn consume_follow_prints_new_records_and_exits_0_on_sigint() {
    let b = Broker::start();
    b.cli()
        .args(["produce", "live"])
        .write_stdin("before\n")
        .assert()
        .success();
    let mut child = std::process::Command::new(cargo_bin!("streambus"))
        .args(["--broker", &b.addr(), "consume", "live", "--follow"])
        .args(["--format", "{offset} {key} {value}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn streambus");
    let lines = lines_of(&mut child);
    let wait = Duration::from_secs(30);
    // The record stored before: the consumer is assigned and waiting now.
    assert_eq!(lines.recv_timeout(wait).expect("first line"), "0  before");
    b.cli()
        .args(["produce", "live", "--key", "k"])
        .write_stdin("after\n")
        .assert()
        .success();
    assert_eq!(lines.recv_timeout(wait).expect("second line"), "1 k after");
    // Still following, not exited.
    assert!(child.try_wait().expect("try_wait").is_none());

    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(kill.success());
    let status = wait_exit(&mut child, wait);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(err, "");
}

#[test]
fn consume_follow_with_count_exits_after_that_many() {
    let b = Broker::start();
    b.cli().args(["topics", "create", "c"]).assert().success();
    let mut child = std::process::Command::new(cargo_bin!("streambus"))
        .args([
            "--broker",
            &b.addr(),
            "consume",
            "c",
            "--follow",
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn streambus");
    let lines = lines_of(&mut child);
    b.cli()
        .args(["produce", "c"])
        .write_stdin("one\ntwo\nthree\n")
        .assert()
        .success();
    let wait = Duration::from_secs(30);
    assert_eq!(lines.recv_timeout(wait).expect("line"), "one");
    assert_eq!(lines.recv_timeout(wait).expect("line"), "two");
    assert_eq!(wait_exit(&mut child, wait).code(), Some(0));
    assert!(lines.recv_timeout(wait).is_err(), "a third line");
}

#[test]
fn bench_json_counts_match_what_was_sent() {
    let b = Broker::start();
    let json = |args: &[&str]| -> Value {
        let a = b.cli().args(args).assert().success();
        assert_eq!(stderr(&a), "", "no progress bar when not on a terminal");
        serde_json::from_str(&stdout(&a)).expect("one JSON object")
    };
    let p = json(&["bench", "produce", "-n", "2000", "--size", "50", "--json"]);
    assert_eq!(p["mode"], "produce");
    assert_eq!(p["topic"], "bench");
    assert_eq!(p["messages"], 2000);
    assert_eq!(p["bytes"], 100_000);
    assert_eq!(p["latency_samples"], 2000);
    assert!(p["messages_per_sec"].as_f64().is_some_and(|r| r > 0.0));
    let lat = &p["latency_ns"];
    let at = |k: &str| {
        lat[k]
            .as_u64()
            .unwrap_or_else(|| panic!("latency_ns.{k}: {lat}"))
    };
    assert!(at("p50") > 0 && at("p50") <= at("p90") && at("p90") <= at("p99"));
    assert!(at("p99") <= at("p99_9") && at("p99_9") <= at("max"));
    b.cli()
        .args(["offsets", "bench"])
        .assert()
        .success()
        .stdout("PARTITION  START  END\n0          0      2000\n");

    let c = json(&["bench", "consume", "--json"]);
    assert_eq!(c["mode"], "consume");
    assert_eq!(c["messages"], 2000);
    assert_eq!(c["bytes"], 100_000);
    let c = json(&["bench", "consume", "-n", "500", "--json"]);
    assert_eq!(c["messages"], 500);
    assert_eq!(c["bytes"], 25_000);
    // Plain (not idempotent) produce, for comparison runs.
    let p = json(&[
        "bench",
        "produce",
        "-t",
        "plain",
        "-n",
        "300",
        "--idempotence",
        "false",
        "--json",
    ]);
    assert_eq!(p["messages"], 300);

    // Text: two lines.
    let a = b
        .cli()
        .args(["bench", "produce", "-t", "text", "-p", "2", "-n", "100"])
        .assert()
        .success();
    let out = stdout(&a);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("produce: 100 messages in "), "{out}");
    assert!(lines[0].ends_with(" MB/s"), "{out}");
    assert!(
        lines[1].starts_with("latency (enqueue to acknowledgement, 100 samples): p50 "),
        "{out}"
    );
    let a = b
        .cli()
        .args(["topics", "describe", "text"])
        .assert()
        .success();
    assert!(
        stdout(&a).starts_with("topic text: 2 partitions, 100 records stored\n"),
        "{}",
        stdout(&a)
    );

    b.cli()
        .args(["topics", "create", "empty"])
        .assert()
        .success();
    fails_with(
        &mut b.cli(),
        &["bench", "consume", "-t", "empty"],
        1,
        "error: topic empty holds no records: run `streambus bench produce` first",
    );
    fails_with(
        &mut b.cli(),
        &["bench", "replay"],
        2,
        "error: invalid value 'replay' for '<MODE>'\n  [possible values: produce, roundtrip, consume, requests, pingpong, pipeline, fetch, connections, longpoll, trickle, handshakes, producers]\n\n\
         For more information, try '--help'.",
    );
}

#[test]
fn bench_plot_writes_a_latency_chart_and_refuses_other_formats() {
    let b = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("latency.svg");
    let png = dir.path().join("latency.png");
    for (mode, path) in [("roundtrip", &svg), ("produce", &png)] {
        b.cli()
            .args(["bench", mode, "-n", "300", "--plot"])
            .arg(path)
            .assert()
            .success();
    }
    let text = std::fs::read_to_string(&svg).expect("the SVG chart");
    assert!(text.starts_with("<svg"), "{text:.60}");
    assert!(
        text.contains("streambus bench roundtrip: p50 "),
        "the title"
    );
    assert!(text.contains("(300 samples)"), "the sample count");
    assert!(text.contains("99%"), "percentile labels");
    assert!(text.contains("<polyline"), "the curve");
    let bytes = std::fs::read(&png).expect("the PNG chart");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());

    fails_with(
        &mut b.cli(),
        &["bench", "produce", "--plot", "chart.jpg"],
        2,
        "error: invalid value 'chart.jpg' for '--plot <FILE>': chart.jpg must end in .svg or .png (the chart's format)\n\n\
         For more information, try '--help'.",
    );
    assert!(!std::path::Path::new("chart.jpg").exists());
}

#[test]
fn produce_stops_on_sigint_and_reports_what_it_sent() {
    let b = Broker::start();
    let mut child = std::process::Command::new(cargo_bin!("streambus"))
        .args(["--broker", &b.addr(), "produce", "typed"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn streambus");
    let mut stdin = child.stdin.take().expect("piped stdin");
    std::io::Write::write_all(&mut stdin, b"a\nb\n").expect("write");
    std::io::Write::flush(&mut stdin).expect("flush");
    // Batches go after their linger, before the end of the input: wait until both are stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = b
            .cli()
            .args(["offsets", "typed"])
            .output()
            .expect("offsets");
        if String::from_utf8_lossy(&out.stdout).ends_with("0      2\n") {
            break;
        }
        assert!(Instant::now() < deadline, "the two records never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(kill.success());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    drop(stdin);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(
        err,
        "produced 2 records to typed (partition 0: offsets 0-1)\n"
    );
}

#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    let b = Broker::start();
    // More than a pipe holds, so the writer meets the closed pipe.
    let input: String = (0..20_000)
        .map(|i| format!("record number {i}\n"))
        .collect();
    b.cli()
        .args(["produce", "many"])
        .write_stdin(input)
        .assert()
        .success();
    let mut child = std::process::Command::new(cargo_bin!("streambus"))
        .args(["--broker", &b.addr(), "consume", "many"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn streambus");
    let lines = lines_of(&mut child);
    let wait = Duration::from_secs(30);
    assert_eq!(lines.recv_timeout(wait).expect("a line"), "record number 0");
    drop(lines); // the reader thread ends at its next line and closes the pipe
    let status = wait_exit(&mut child, wait);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(err, "");
}

#[test]
fn bench_roundtrip_clients_and_duration() {
    let b = Broker::start();
    let json = |args: &[&str]| -> Value {
        let a = b.cli().args(args).assert().success();
        serde_json::from_str(&stdout(&a)).expect("one JSON object")
    };
    let r = json(&[
        "bench",
        "roundtrip",
        "-n",
        "300",
        "--clients",
        "2",
        "--json",
    ]);
    assert_eq!(r["mode"], "roundtrip");
    assert_eq!(r["messages"], 300);
    assert_eq!(r["latency_samples"], 300);
    assert_eq!(r["bytes"], 30_000);

    // Three clients share 3001 records over three partitions.
    let p = json(&[
        "bench", "produce", "-t", "wide", "-p", "3", "-c", "3", "-n", "3001", "--json",
    ]);
    assert_eq!(p["messages"], 3001);
    let a = b
        .cli()
        .args(["offsets", "wide", "--json"])
        .assert()
        .success();
    let offsets: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    let stored: i64 = offsets
        .as_array()
        .expect("array")
        .iter()
        .map(|o| o["end"].as_i64().expect("end") - o["start"].as_i64().expect("start"))
        .sum();
    assert_eq!(stored, 3001);
    assert_eq!(
        json(&["bench", "consume", "-t", "wide", "--json"])["messages"],
        3001
    );

    // For a duration: as many as fit, all acknowledged.
    let d = json(&[
        "bench",
        "produce",
        "-t",
        "timed",
        "--duration",
        "300ms",
        "--json",
    ]);
    let sent = d["messages"].as_u64().expect("messages");
    assert!(sent > 0, "{d}");
    assert!(d["seconds"].as_f64().is_some_and(|s| s >= 0.3), "{d}");
    let a = b.cli().args(["offsets", "timed"]).assert().success();
    assert_eq!(
        stdout(&a),
        format!("PARTITION  START  END\n0          0      {sent}\n")
    );
}

#[test]
fn bench_raw_modes_count_exactly_what_they_did() {
    let b = Broker::start();
    let json = |args: &[&str]| -> Value {
        let a = b.cli().args(args).assert().success();
        serde_json::from_str(&stdout(&a)).expect("one JSON object")
    };
    // pingpong needs no broker: the floor.
    let p = json(&["bench", "pingpong", "-n", "500", "--json"]);
    assert_eq!(p["mode"], "pingpong");
    assert_eq!(p["messages"], 500);
    assert_eq!(p["latency_samples"], 500);
    assert_eq!(p["frame_bytes"]["reply"], 35);

    // pipeline: 3 connections × 4 in flight of 10-record Produces; 1000 records land.
    let p = json(&[
        "bench",
        "pipeline",
        "-t",
        "pipe",
        "-n",
        "1000",
        "--batch",
        "10",
        "--connections",
        "3",
        "--in-flight",
        "4",
        "--size",
        "20",
        "--json",
    ]);
    assert_eq!(p["messages"], 1000);
    assert_eq!(p["bytes"], 20_000);
    assert_eq!(p["latency_samples"], 100, "one sample per request");
    assert_eq!(
        p["shape"],
        serde_json::json!({"batch": 10, "in_flight": 4, "connections": 3, "idempotent": false})
    );
    let a = b.cli().args(["offsets", "pipe"]).assert().success();
    assert_eq!(
        stdout(&a),
        "PARTITION  START  END\n0          0      1000\n"
    );

    // fetch reads the pipeline's records back, 300 of them exactly.
    let f = json(&[
        "bench",
        "fetch",
        "-t",
        "pipe",
        "-n",
        "300",
        "--max-bytes",
        "4096",
        "--json",
    ]);
    assert_eq!(f["messages"], 300);
    assert_eq!(f["bytes"], 6_000);
    assert_eq!(f["max_bytes"], 4096);

    // connections: the broker runs in this process, so its memory is this process's.
    let pid = std::process::id().to_string();
    let c = json(&[
        "bench",
        "connections",
        "--connections",
        "50",
        "--server-pid",
        &pid,
        "--json",
    ]);
    assert_eq!(c["messages"], 50);
    assert_eq!(c["latency_samples"], 50);
    assert!(
        c["server_rss"]["before_kib"]
            .as_u64()
            .is_some_and(|k| k > 0),
        "{c}"
    );
    // From two source addresses, held after the report.
    let a = b
        .cli()
        .args([
            "bench",
            "connections",
            "--connections",
            "6",
            "--sources",
            "2",
            "--first-source",
            "2",
            "--hold",
            "1ms",
        ])
        .assert()
        .success();
    let out = stdout(&a);
    assert!(out.starts_with("connections: 6 connections in "), "{out}");
    assert!(
        out.ends_with("ready: holding 6 connections for 1ms\n"),
        "{out}"
    );

    // longpoll: every fetch brings its record.
    let l = json(&[
        "bench", "longpoll", "-t", "lp", "-d", "400ms", "--rounds", "1", "--json",
    ]);
    assert_eq!(l["mode"], "longpoll");
    assert!(l["messages"].as_u64().is_some_and(|n| n > 0), "{l}");
    assert_eq!(l["messages"], l["latency_samples"]);
    assert_eq!(l["sync_produce"]["empty_fetches"], 0, "{l}");

    // trickle: three stalled half-frames, then a fresh connection is still answered.
    let t = json(&[
        "bench",
        "trickle",
        "-t",
        "tr",
        "--connections",
        "3",
        "--frame-bytes",
        "100000",
        "--send-bytes",
        "40000",
        "-d",
        "100ms",
        "--json",
    ]);
    assert_eq!(t["messages"], 3);
    assert_eq!(t["latency_samples"], 1);
    assert_eq!(t["trickle"]["send_bytes"], 40_000);
    assert_eq!(t["trickle"]["frame_bytes"], 100_000);
    fails_with(
        &mut b.cli(),
        &["bench", "connections", "--server-pid", "4000000000"],
        2,
        "error: --server-pid 4000000000: no such process (its /proc/4000000000/status cannot be read)",
    );
}

#[test]
fn bench_reads_the_brokers_fsyncs_and_memory_from_its_metrics() {
    let b = Broker::with(None, |c| {
        c.fsync = streambus_server::FsyncMode::Always;
        c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    });
    let metrics = b
        .running
        .metrics_addr()
        .expect("metrics listener")
        .to_string();
    let a = b
        .cli()
        .args([
            "bench",
            "pipeline",
            "-n",
            "500",
            "--batch",
            "5",
            "--in-flight",
            "1",
        ])
        .args(["--metrics", &metrics, "--json"])
        .assert()
        .success();
    let p: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(p["messages"], 500);
    // One request in flight under --fsync always: each of the 100 waits for its own fsync.
    assert_eq!(p["fsyncs"]["count"], 100, "{p}");
    assert_eq!(p["fsyncs"]["requests_per_fsync"], 1.0, "{p}");
    // Without --server-pid, connections reads the broker's memory from its metrics (this
    // process's, where the broker runs).
    let a = b
        .cli()
        .args(["bench", "connections", "--connections", "20"])
        .args(["--metrics", &metrics, "--json"])
        .assert()
        .success();
    let c: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(c["messages"], 20);
    let before = c["server_rss"]["before_kib"].as_u64().expect("RSS before");
    assert!(before > 1024, "{c}");
    assert!(c["server_rss"]["bytes_per_connection"].is_number(), "{c}");
    let dead = dead_addr();
    fails_with(
        &mut b.cli(),
        &["bench", "pipeline", "--metrics", &dead],
        1,
        &format!("error: --metrics {dead}: Connection refused (os error 111)"),
    );
}

#[test]
fn bench_requests_over_connections() {
    let b = Broker::start();
    let a = b
        .cli()
        .args([
            "bench",
            "requests",
            "-n",
            "1000",
            "--connections",
            "2",
            "--in-flight",
            "8",
            "--json",
        ])
        .assert()
        .success();
    let r: Value = serde_json::from_str(&stdout(&a)).expect("JSON");
    assert_eq!(r["mode"], "requests");
    assert_eq!(r["messages"], 1000);
    assert_eq!(r["latency_samples"], 1000);
    let a = b
        .cli()
        .args(["bench", "requests", "-n", "10"])
        .assert()
        .success();
    assert!(
        stdout(&a).starts_with("requests: 10 requests in "),
        "{}",
        stdout(&a)
    );
    assert!(stdout(&a).contains(" req/s, "), "{}", stdout(&a));
    fails_with(
        &mut b.cli(),
        &["bench", "requests", "--in-flight", "129"],
        2,
        "error: invalid value '129' for '--in-flight <M>': 129 is not in 1..=128\n\n\
         For more information, try '--help'.",
    );
}

/// `auth new-token` prints a fresh token and its auth-file line; a broker with that line
/// takes the token from `--token` or `STREAMBUS_TOKEN` and refuses a client without it.
#[test]
fn auth_new_token_makes_a_token_the_broker_accepts() {
    let a = cli_at("127.0.0.1:9")
        .args(["auth", "new-token", "ops"])
        .assert()
        .success();
    let out = stdout(&a);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let (token, line) = (lines[0], lines[1]);
    assert_eq!(token.len(), 64, "{token}");
    assert!(line.starts_with("ops = { token_sha256 = \""), "{line}");
    assert!(!line.contains(token));
    assert!(stderr(&a).contains("SIGHUP"));
    // Give it permissions and start a broker with it.
    let line = line.replace("admin = []", "admin = [\"*\"]");
    let b = Broker::start_with_auth(Some(&format!("[principals]\n{line}\n")));
    b.cli()
        .args(["--token", token, "topics", "create", "secured"])
        .assert()
        .success();
    b.cli()
        .env("STREAMBUS_TOKEN", token)
        .args(["topics", "list"])
        .assert()
        .success()
        .stdout("TOPIC    PARTITIONS\nsecured  1\n");
    let a = b.cli().args(["topics", "list"]).assert().code(1).stdout("");
    let err = stderr(&a);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("AuthenticationFailed (40)"), "{err}");
    let a = b
        .cli()
        .args(["--token", "wrong-token", "topics", "list"])
        .assert()
        .code(1)
        .stdout("");
    let err = stderr(&a);
    assert!(err.contains("AuthenticationFailed (40)"), "{err}");
    assert!(!err.contains("wrong-token"), "{err}");
    // A principal name the command line can't use is a usage error.
    fails_with(
        &mut cli_at("127.0.0.1:9"),
        &["auth", "new-token", ""],
        2,
        "error: invalid PRINCIPAL \"\": 1 to 255 bytes without control characters",
    );
}
