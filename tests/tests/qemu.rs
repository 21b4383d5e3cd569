//! The embedded client on an emulated Cortex-M4: `examples/mps2-an386` in QEMU, its UART
//! connected to the real broker (or to a peer that fails), the device's records read back
//! with the host SDK.
//!
//! Ignored by default: it needs `qemu-system-arm` and the `thumbv7em-none-eabihf` target.
//! `.ci/run` installs both and runs `cargo test -p streambus-tests --test qemu -- --ignored`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use streambus_client::Offset;
use streambus_client::blocking::{Client, Consumer};
use streambus_core::{
    CreateTopicResponse, FrameDecoder, RequestFrame, Response, Status, Topic, encode_response,
};
use streambus_server::RuntimeKind;
use streambus_tests::start_broker;

/// QEMU runs under `timeout` with this bound: a device that hangs fails the test.
const QEMU_TIMEOUT: Duration = Duration::from_secs(60);
/// The firmware's request timeout (`REQUEST_TIMEOUT` in examples/mps2-an386/src/main.rs).
const DEVICE_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The firmware's record sizes (`SIZES`), and the 1 KiB record it sends in between.
const SIZES: [usize; 5] = [1, 100, 1000, 2048, 4000];
const SMALL: usize = 1024;

/// Byte `i` of record `k`'s value in round `round`, as the firmware writes it.
fn value_byte(round: u8, k: usize, i: usize) -> u8 {
    ((7 * i + 31 * k + 101 * usize::from(round)) % 251) as u8
}

/// The (key, value) of every record the firmware writes, in order: round `b` (blocking
/// client), the 1 KiB record `m`, round `a` (async client).
fn expected_records() -> Vec<(Vec<u8>, Vec<u8>)> {
    let round = |r: u8, sizes: &[usize]| -> Vec<(Vec<u8>, Vec<u8>)> {
        sizes
            .iter()
            .enumerate()
            .map(|(k, &len)| {
                let key = vec![r, b'0' + k as u8];
                (key, (0..len).map(|i| value_byte(r, k, i)).collect())
            })
            .collect()
    };
    let mut all = round(b'b', &SIZES);
    all.extend(round(b'm', &[SMALL]));
    all.extend(round(b'a', &SIZES));
    all
}

/// Builds the firmware once (release); its ELF.
fn firmware() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mps2-an386");
        // The example is its own workspace with its own target; nothing of this build leaks in.
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet"])
            .current_dir(&dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .status()
            .expect("run cargo");
        assert!(status.success(), "building examples/mps2-an386 failed");
        dir.join("target/thumbv7em-none-eabihf/release/streambus-mps2-an386")
    })
}

/// What a QEMU run printed and how it ended.
struct Run {
    /// The device's semihosting output.
    stdout: String,
    /// QEMU's exit code (0: the firmware reported success; 1: it reported an error; 124:
    /// `timeout` stopped a device that hung).
    code: Option<i32>,
    took: Duration,
}

/// Runs the firmware on an emulated MPS2 AN386 whose UART0 connects to `addr` (which must
/// already listen: QEMU connects once, at start).
fn run_device(addr: SocketAddr) -> Run {
    let elf = firmware();
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["--kill-after=5", &QEMU_TIMEOUT.as_secs().to_string()])
        .args(["qemu-system-arm", "-M", "mps2-an386", "-cpu", "cortex-m4"])
        .args(["-nographic", "-monitor", "none"])
        .args(["-serial", &format!("tcp:{addr},nodelay=on")])
        .args(["-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(elf)
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-system-arm (apt-get install qemu-system-arm)");
    let run = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        code: out.status.code(),
        took: started.elapsed(),
    };
    eprintln!(
        "qemu exit {:?} after {:?}\n{}{}",
        run.code,
        run.took,
        run.stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    run
}

#[test]
#[ignore = "needs qemu-system-arm and the thumbv7em-none-eabihf target (.ci/run runs it)"]
fn the_device_produces_into_the_real_broker_and_its_records_read_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), RuntimeKind::Tokio);
    let run = run_device(broker.addr());
    assert_eq!(run.code, Some(0), "the device reported a failure");
    assert!(run.stdout.contains("\nok in "), "{}", run.stdout);

    let client = Client::connect(broker.addr().to_string()).unwrap();
    let mut consumer = Consumer::new(&client);
    consumer.assign("mcu", 0, Offset::Earliest).unwrap();
    let expected = expected_records();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < expected.len() && Instant::now() < deadline {
        got.extend(consumer.poll(Duration::from_millis(500)).unwrap());
    }
    assert_eq!(got.len(), expected.len(), "records stored");
    for (i, (record, (key, value))) in got.iter().zip(&expected).enumerate() {
        assert_eq!(record.offset, i as i64);
        assert_eq!(record.key(), &key[..], "key at offset {i}");
        assert!(record.value() == &value[..], "value at offset {i} differs");
    }
    assert_eq!(client.offsets("mcu", 0).unwrap().end, expected.len() as i64);
}

/// A peer on 127.0.0.1 port 0 that reads the device's first request and hands it, with the
/// connection, to `answer`.
fn fake_broker(answer: impl FnOnce(TcpStream, &[u8]) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(QEMU_TIMEOUT)).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let len = loop {
            match FrameDecoder::requests().next_frame(&buf) {
                Ok(Status::Complete(len)) => break len,
                Ok(Status::Partial(_)) => {}
                Err(e) => panic!("the device sent a bad frame: {e}"),
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "the device closed before its first request");
            buf.extend_from_slice(&chunk[..n]);
        };
        answer(s, &buf[..len]);
    });
    addr
}

/// The whole reply to the device's first request (a CreateTopic).
fn create_topic_reply(request: &[u8]) -> Vec<u8> {
    let id = RequestFrame::new_checked(request).unwrap().request_id();
    let reply = Response::CreateTopic(CreateTopicResponse {
        topic: Topic::new("mcu").unwrap(),
        created: true,
    });
    let mut buf = vec![0u8; 64];
    let n = encode_response(id, &reply, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Keeps the connection open until the device goes away.
fn wait_for_close(mut s: TcpStream) {
    let mut sink = [0u8; 256];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

#[test]
#[ignore = "needs qemu-system-arm and the thumbv7em-none-eabihf target (.ci/run runs it)"]
fn the_device_reports_a_broker_that_closes_mid_reply_at_its_request_timeout() {
    let addr = fake_broker(|mut s, request| {
        let reply = create_topic_reply(request);
        s.write_all(&reply[..reply.len() / 2]).unwrap();
        // Dropping `s` closes the connection; the UART can't tell, so the deadline must.
    });
    let run = run_device(addr);
    assert_eq!(run.code, Some(1), "the device reports the failure");
    assert!(
        run.stdout
            .contains("error: create_topic: request 1 timed out"),
        "{}",
        run.stdout
    );
    // At the deadline: not before it (nothing else can tell), and not much after it.
    let late = DEVICE_REQUEST_TIMEOUT + Duration::from_secs(10);
    assert!(
        (DEVICE_REQUEST_TIMEOUT..late).contains(&run.took),
        "{:?}",
        run.took
    );
}

#[test]
#[ignore = "needs qemu-system-arm and the thumbv7em-none-eabihf target (.ci/run runs it)"]
fn the_device_reports_a_broker_answering_garbage_as_a_protocol_violation() {
    // Text where a frame should be: "HTTP" read as a Length is far above the maximum.
    let addr = fake_broker(|mut s, _| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        wait_for_close(s);
    });
    let run = run_device(addr);
    assert_eq!(run.code, Some(1), "the device reports the failure");
    let want = "error: create_topic: protocol violation by the broker: bad response: \
                frame length 1213486160 exceeds the maximum 10485760";
    assert!(run.stdout.contains(want), "{}", run.stdout);

    // A reply whose last CRC byte is damaged.
    let addr = fake_broker(|mut s, request| {
        let mut reply = create_topic_reply(request);
        if let Some(b) = reply.last_mut() {
            *b ^= 0xff;
        }
        s.write_all(&reply).unwrap();
        wait_for_close(s);
    });
    let run = run_device(addr);
    assert_eq!(run.code, Some(1), "the device reports the failure");
    let want = "error: create_topic: protocol violation by the broker: bad response: \
                CRC mismatch in request 1";
    assert!(run.stdout.contains(want), "{}", run.stdout);
}
