//! The `streambus-server` binary: invalid settings exit 2 with one line; SIGTERM stops it
//! cleanly (exit 0) after it served a request; SIGHUP reloads the auth file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_streambus-server");

#[test]
fn invalid_settings_exit_2_with_one_line_naming_the_setting() {
    for (args, needle) in [
        (&["--read-timeout", "soon"][..], "--read-timeout"),
        (&["--listen", "nowhere"][..], "--listen"),
        (&["--fsync", "sometimes"][..], "--fsync"),
        (&["--max-connections", "0"][..], "--max-connections"),
        (
            &["--max-buffered-bytes", "1000000"][..],
            "--max-buffered-bytes",
        ),
        (&["--max-fetch-wait", "forever"][..], "--max-fetch-wait"),
    ] {
        let (code, err) = run(args, &[]);
        assert_eq!(code, Some(2), "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Runs the binary with `args` and `env`; its exit code and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_setting_names_where_it_came_from_and_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(&["--fsync", "sometimes"], &[]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "error: invalid value 'sometimes' for '--fsync <FSYNC>' (allowed: always, interval, never)\n"
    );
    let (code, err) = run(&[], &[("STREAMBUS_FSYNC", "sometimes")]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "error: invalid value 'sometimes' for '--fsync <FSYNC>' (allowed: always, interval, never) (from STREAMBUS_FSYNC)\n"
    );
    let (code, err) = run(&[], &[("STREAMBUS_READ_TIMEOUT", "soon")]);
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with("error: invalid setting --read-timeout (from STREAMBUS_READ_TIMEOUT): \"soon\" is not a duration"),
        "{err}"
    );
    // A negative number is a bad value of the setting, not an unknown flag.
    let (code, err) = run(&["--max-frame-bytes", "-1"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with("error: invalid value '-1' for '--max-frame-bytes <MAX_FRAME_BYTES>'"),
        "{err}"
    );
    let (code, err) = run(&["--max-frame-bytes", "4000000000"], &[]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "error: invalid setting --max-frame-bytes: 4000000000 is outside 1024 to 1073741824 (1 GiB)\n"
    );
    // From the config file: its path, line and key.
    let file = dir.path().join("broker.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nretention_time = \"soon\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, err) = run(&["--config", f], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with(&format!(
            "error: invalid setting --retention-time (from {f} line 2, retention_time): \"soon\""
        )),
        "{err}"
    );
    std::fs::write(&file, "# broker\nfsync = \"sometimes\"\n").unwrap();
    let (code, err) = run(&["--config", f], &[]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        format!(
            "error: config file {f} line 2 (fsync): unknown variant `sometimes`, expected one of `always`, `interval`, `never`\n"
        )
    );
    let (code, err) = run(&["--segment-bytes", "10"], &[]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "error: invalid setting --segment-bytes: 10 is outside 1048576 (1 MiB) to 1099511627776 (1 TiB)\n"
    );
}

#[test]
fn bad_cluster_settings_exit_2_with_one_line_naming_the_setting_and_its_source() {
    let listen = ["--cluster-listen", "127.0.0.1:0"];
    let peers3 = "1=127.0.0.1:9301,2=127.0.0.1:9302,3=127.0.0.1:9303";
    for (args, env, want) in [
        (
            vec!["--node-id", "4", listen[0], listen[1], "--peers", peers3],
            vec![],
            "error: invalid setting --peers: this broker's --node-id 4 is not among the peers (1, 2, 3)\n",
        ),
        (
            vec!["--node-id", "1", listen[0], listen[1]],
            vec![("STREAMBUS_PEERS", "1=h:1,1=h:2")],
            "error: invalid setting --peers (from STREAMBUS_PEERS): node id 1 is listed twice\n",
        ),
        (
            vec![
                "--node-id",
                "1",
                listen[0],
                listen[1],
                "--peers",
                "0=h:1,1=h:2",
            ],
            vec![],
            "error: invalid setting --peers: \"0\" is not a node id from 1 to 2147483647\n",
        ),
        (
            vec![
                "--node-id",
                "1",
                listen[0],
                listen[1],
                "--peers",
                "1=nohost",
            ],
            vec![],
            "error: invalid setting --peers: \"nohost\" is not an address like broker1.example.com:9092 (no :PORT)\n",
        ),
        (
            vec!["--node-id", "1", "--peers", peers3],
            vec![],
            "error: invalid setting --cluster-listen: missing: --peers needs this broker's cluster listener address\n",
        ),
        (
            vec!["--node-id", "1"],
            vec![("STREAMBUS_CLUSTER_LISTEN", "127.0.0.1:0")],
            "error: invalid setting --peers: missing: --cluster-listen needs the list of brokers (ID=HOST:PORT,...)\n",
        ),
        (
            vec!["--node-id", "1", "--peers", peers3],
            vec![("STREAMBUS_CLUSTER_LISTEN", "nowhere")],
            "error: invalid setting --cluster-listen (from STREAMBUS_CLUSTER_LISTEN): \"nowhere\" is not an address like 127.0.0.1:9092\n",
        ),
    ] {
        let (code, err) = run(&args, &env);
        assert_eq!((code, err.as_str()), (Some(2), want), "{args:?} {env:?}");
    }
    // From the config file: its path, line and key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(
        &file,
        "node_id = 2\ncluster_listen = \"127.0.0.1:0\"\npeers = \"1=h:1,3=h:3\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, err) = run(&["--config", f], &[]);
    assert_eq!(
        (code, err),
        (
            Some(2),
            format!(
                "error: invalid setting --peers (from {f} line 3, peers): this broker's --node-id 2 is not among the peers (1, 3)\n"
            )
        )
    );
}

#[test]
fn a_failed_start_leaves_no_data_directory_and_a_file_is_not_one() {
    let dir = tempfile::tempdir().unwrap();
    // The port is taken: the broker fails before it creates anything.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let start = |listen: &str, metrics: &str, data: &std::path::Path| {
        let data = data.to_str().unwrap();
        run(
            &[
                "--listen",
                listen,
                "--metrics-listen",
                metrics,
                "--data-dir",
                data,
            ],
            &[],
        )
    };
    let (code, err) = start(&port, "off", &data);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("binding {port}: Address already in use")),
        "{err}"
    );
    assert!(!data.exists(), "the data directory was created");
    // The same when the metrics port is taken.
    let (code, err) = start("127.0.0.1:0", &port, &data);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("binding metrics on {port}")), "{err}");
    assert!(!data.exists(), "the data directory was created");
    // A data directory that is a file says so.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, err) = start("127.0.0.1:0", "off", &file);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.ends_with("it is a file, not a directory (--data-dir)\n"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_the_broker_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log line "broker listening addr=127.0.0.1:PORT" tells where it is.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("broker exited early").unwrap();
        if line.contains("broker listening") {
            // On stderr, plain text when not a terminal, with the effective settings.
            assert!(!line.contains('\x1b'), "colour codes in {line:?}");
            for field in [
                "fsync=Interval",
                "config=none",
                "runtime=Tokio",
                "data_dir=",
            ] {
                assert!(line.contains(field), "no {field} in {line:?}");
            }
        }
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace())
                .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            break addr;
        }
    };
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::Write;
    s.write_all(&health_check_frame()).unwrap();
    assert!(is_health_reply(&read_frame(&mut s).unwrap()));
    drop(s);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "broker did not stop within 15 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(lines);
}

/// The value after `key=` in a log line (up to the next space).
fn field(line: &str, key: &str) -> Option<String> {
    let rest = line.split(&format!("{key}=")).nth(1)?;
    Some(
        rest.chars()
            .take_while(|c| !c.is_whitespace())
            .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect(),
    )
}

/// A fresh connection whose HealthCheck was answered (`None`: closed without an answer).
fn answered(addr: &str) -> Option<std::net::TcpStream> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    (s.write_all(&health_check_frame()).is_ok()
        && read_frame(&mut s).is_ok_and(|r| is_health_reply(&r)))
    .then_some(s)
}

/// A HealthCheck request frame, encoded by the core.
fn health_check_frame() -> Vec<u8> {
    use streambus_core::{Flags, Request, encode_request, request_encoded_len};
    let mut frame = vec![0u8; request_encoded_len(&Request::HealthCheck)];
    encode_request(1, Flags::REQUIRE_ACK, &Request::HealthCheck, &mut frame).unwrap();
    frame
}

/// Reads one response frame (its Length field included), its end found by the core's decoder.
fn read_frame(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use streambus_core::{FrameDecoder, Status};
    let decoder = FrameDecoder::responses();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decoder.next_frame(&buf) {
            Ok(Status::Complete(n)) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Ok(Status::Partial(_)) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        let k = s.read(&mut chunk)?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..k]);
    }
}

/// Whether `frame` is a successful HealthCheck reply.
fn is_health_reply(frame: &[u8]) -> bool {
    use streambus_core::{RequestType, Response, ResponseFrame};
    ResponseFrame::new_checked(frame)
        .ok()
        .and_then(|f| Response::parse(&f, RequestType::HealthCheck).ok())
        .is_some_and(|r| matches!(r, Response::HealthCheck(_)))
}

/// Whether a fresh connection's HealthCheck is answered.
fn healthy(addr: &str) -> bool {
    answered(addr).is_some()
}

fn metric(addr: &str, name: &str) -> u64 {
    metric_if_any(addr, name).unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// A metric's value, `None` while it has never been recorded (a labelled counter).
fn metric_if_any(addr: &str, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn under_a_low_descriptor_limit_connections_are_capped_and_counted_and_storage_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    // soft = hard = 256: nothing to raise; the broker keeps 64 for storage.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 256 && exec {BIN} --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir {}",
            dir.path().display()
        ))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut cap = None;
    let (addr, metrics) = loop {
        let line = lines.next().expect("broker exited early").unwrap();
        if let Some(n) = line.split("serving at most ").nth(1) {
            cap = n.split(' ').next().and_then(|n| n.parse::<usize>().ok());
        }
        if line.contains("broker listening") {
            break (
                field(&line, "addr").unwrap(),
                field(&line, "metrics").unwrap(),
            );
        }
    };
    let cap = cap.expect("one line at start says the connection count is capped");
    assert!((100..256).contains(&cap), "cap {cap}");
    // Hold `cap` connections, each answered; every one beyond is closed at once and counted.
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    for _ in 0..cap {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(&health_check_frame()).unwrap();
        assert!(is_health_reply(&read_frame(&mut s).unwrap()));
        held.push(s);
    }
    for _ in 0..20 {
        assert!(!healthy(&addr), "a connection over the cap was answered");
    }
    assert_eq!(metric(&metrics, "streambus_connections_refused_total"), 20);
    // Storage still has its descriptors: free one connection, then create a topic with eight
    // partitions (16 segment files and their directory work) and produce to it.
    drop(held.pop());
    // The broker frees the slot once it sees the close: the first connection answered then
    // holds it (others may be refused meanwhile, and are counted).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        if let Some(c) = answered(&addr) {
            break c;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
    };
    let topic = streambus_core::Topic::new("fd").unwrap();
    let created = call(
        &mut c,
        &streambus_core::Request::CreateTopic(streambus_core::CreateTopicRequest {
            topic,
            num_partitions: 8,
            replication_factor: 1,
        }),
    );
    assert!(
        matches!(created, Ok(streambus_core::Response::CreateTopic(t)) if t.created),
        "{created:?}"
    );
    for partition in 0..8 {
        let (count, set) = one_message(b"still stored");
        let produced = call(
            &mut c,
            &streambus_core::Request::Produce(streambus_core::ProduceRequest {
                topic,
                partition,
                messages: streambus_core::MessageSet::new_checked(count, &set).unwrap(),
                producer: None,
            }),
        );
        assert!(
            matches!(produced, Ok(streambus_core::Response::Produce(p)) if p.base_offset == 0),
            "partition {partition}: {produced:?}"
        );
    }
    drop(held);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// One message with `value`, encoded by the core.
fn one_message(value: &[u8]) -> (u32, Vec<u8>) {
    use streambus_core::{Encode, Message, MessageSetBuilder};
    let m = Message::new(b"", value);
    let mut buf = vec![0u8; m.encoded_len()];
    let mut b = MessageSetBuilder::new(&mut buf);
    b.push(&m).unwrap();
    (b.count(), buf)
}

/// Sends `request` and decodes its reply with the core: the success response, or the error's
/// code.
fn call(
    s: &mut std::net::TcpStream,
    request: &streambus_core::Request<'_>,
) -> Result<streambus_core::Response<'static>, u16> {
    use std::io::Write;
    use streambus_core::{Flags, ResponseFrame, encode_request, request_encoded_len};
    let mut frame = vec![0u8; request_encoded_len(request)];
    encode_request(7, Flags::NONE, request, &mut frame).unwrap();
    s.write_all(&frame).unwrap();
    let reply = read_frame(s).unwrap();
    let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
    let frame = ResponseFrame::new_checked(reply).unwrap();
    match streambus_core::Response::parse(&frame, request.request_type()) {
        Ok(streambus_core::Response::Error(e)) => Err(e.code.0),
        Ok(r) => Ok(r),
        Err(e) => panic!("undecodable reply: {e}"),
    }
}

/// An auth file naming `principal` with `token` and the given permission lists.
fn auth_file(principal: &str, token: &str, permissions: &str) -> String {
    format!(
        "[principals]\n{principal} = {{ token_sha256 = \"{}\", {permissions} }}\n",
        streambus_server::auth::token_sha256_hex(token)
    )
}

fn authenticate(s: &mut std::net::TcpStream, token: &str) -> Result<String, u16> {
    let request = streambus_core::Request::Authenticate(
        streambus_core::AuthenticateRequest::token(token.as_bytes()),
    );
    match call(s, &request)? {
        streambus_core::Response::Authenticate(a) => Ok(a.principal.to_string()),
        other => panic!("not an Authenticate reply: {other:?}"),
    }
}

fn produce_one(s: &mut std::net::TcpStream, topic: &str) -> Result<(), u16> {
    let (count, set) = one_message(b"v");
    call(
        s,
        &streambus_core::Request::Produce(streambus_core::ProduceRequest {
            topic: streambus_core::Topic::new(topic).unwrap(),
            partition: 0,
            messages: streambus_core::MessageSet::new_checked(count, &set).unwrap(),
            producer: None,
        }),
    )
    .map(|_| ())
}

#[test]
fn an_invalid_auth_file_is_refused_at_start_with_exit_2_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let hash = streambus_server::auth::token_sha256_hex("tok");
    let cases = [
        ("missing.toml", None, "No such file"),
        ("syntax.toml", Some("[principals\n".to_owned()), "auth file"),
        (
            "hash.toml",
            Some("[principals]\na = { token_sha256 = \"abc\" }\n".to_owned()),
            "64 hex digits",
        ),
        (
            "topic.toml",
            Some(format!(
                "[principals]\na = {{ token_sha256 = \"{hash}\", consume = [\"a b\"] }}\n"
            )),
            "consume",
        ),
    ];
    for (name, text, needle) in cases {
        let path = dir.path().join(name);
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        let out = Command::new(BIN)
            .arg("--auth-file")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(err.contains("--auth-file"), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains(&hash), "{name}: the hash is printed: {err}");
    }
}

#[test]
fn sighup_applies_a_changed_auth_file_to_new_requests_and_keeps_an_invalid_one_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    let (old, new) = (
        "old-token-of-alice-1234567890",
        "new-token-of-alice-0987654321",
    );
    std::fs::write(&path, auth_file("alice", old, "produce = [\"t\"]")).unwrap();
    let mut child = Command::new(BIN)
        .arg("--auth-file")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log lines, read on a thread so a missing line fails the test instead of hanging it.
    let (tx, logs) = std::sync::mpsc::channel::<String>();
    let stdout = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {what:?}"));
            if line.contains(what) {
                return line;
            }
        }
    };
    let started = next_line("broker listening");
    let (addr, metrics) = (
        field(&started, "addr").unwrap(),
        field(&started, "metrics").unwrap(),
    );
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // Waits until the count reaches `want` (a scrape may see the series before its first
    // increment), then returns it.
    let reloads = |result: &str, want: u64| {
        let name = format!("streambus_auth_reloads_total{{reason=\"{result}\"}}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(n) = metric_if_any(&metrics, &name)
                && n >= want
            {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not at {want} after SIGHUP"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    // Both results are scraped from the start, at 0.
    for result in ["ok", "invalid"] {
        let name = format!("streambus_auth_reloads_total{{reason=\"{result}\"}}");
        assert_eq!(metric_if_any(&metrics, &name), Some(0), "{name}");
    }
    let mut alice = std::net::TcpStream::connect(&addr).unwrap();
    assert_eq!(authenticate(&mut alice, old), Ok("alice".to_owned()));
    assert_eq!(produce_one(&mut alice, "t"), Ok(()));

    // A new token, and alice may now consume "t" but no longer produce to it.
    std::fs::write(&path, auth_file("alice", new, "consume = [\"t\"]")).unwrap();
    hup();
    assert_eq!(reloads("ok", 1), 1);
    // The open connection keeps its principal; its next request follows the new rules.
    assert_eq!(produce_one(&mut alice, "t"), Err(41));
    let mut fresh = std::net::TcpStream::connect(&addr).unwrap();
    assert_eq!(authenticate(&mut fresh, old), Err(40));
    assert_eq!(authenticate(&mut fresh, new), Ok("alice".to_owned()));

    // An invalid file is kept out, with one log line saying why; the rules stay.
    std::fs::write(&path, "[principals]\nalice = { token_sha256 = \"nope\" }\n").unwrap();
    hup();
    assert_eq!(reloads("invalid", 1), 1);
    let line = next_line("auth file not reloaded");
    assert!(line.contains("64 hex digits"), "{line}");
    assert!(!line.contains(new) && !line.contains(old), "{line}");
    let mut again = std::net::TcpStream::connect(&addr).unwrap();
    assert_eq!(authenticate(&mut again, new), Ok("alice".to_owned()));
    assert_eq!(produce_one(&mut again, "t"), Err(41));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Listening beyond loopback without `--auth-file` logs a warning at start; with it, none.
#[test]
fn a_non_loopback_listener_without_auth_warns_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        auth_file("ops", "ops-token-1234567890", "admin = [\"*\"]"),
    )
    .unwrap();
    for with_auth in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", "0.0.0.0:0", "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if with_auth {
            cmd.arg("--auth-file").arg(&auth);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut warned = false;
        for line in lines.by_ref().map(Result::unwrap) {
            if line.contains("broker listening") {
                break;
            }
        }
        // The warning is logged at start, before the broker waits for signals: every line
        // up to the end of the output after SIGTERM includes it, if it came.
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        for line in lines.map(Result::unwrap) {
            warned |= line.contains("without authentication");
        }
        assert_eq!(warned, !with_auth, "with auth: {with_auth}");
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
}
