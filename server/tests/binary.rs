//! The `streambus-server` binary: invalid settings exit 2 with one line; SIGTERM stops it
//! cleanly (exit 0) after it served a request.

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
        let out = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
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
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The log line "broker listening addr=127.0.0.1:PORT" tells where it is.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("broker exited early").unwrap();
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
    use std::io::{Read, Write};
    // HealthCheck, id 1 (protocol-v1 §7).
    s.write_all(&[
        0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 1, 7, 1, 0, 0, 0xda, 0xa0, 0xbd, 0x51,
    ])
    .unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(u32::from_be_bytes(head), 0x22);
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
