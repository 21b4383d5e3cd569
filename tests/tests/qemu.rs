//! The embedded client on an emulated Cortex-M4: `examples/mps2-an386` in QEMU, its UART
//! connected to the real broker with `--auth-file` (or to a peer that fails); the device
//! authenticates, produces (once idempotently, with a retry) and fetches; its records are read
//! back with the host SDK.
//!
//! Ignored by default: it needs `qemu-system-arm` and the `thumbv7em-none-eabihf` target.
//! `.ci/run` installs both and runs `cargo test -p streambus-tests --test qemu -- --ignored`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use streambus_client::blocking::{Client, Consumer};
use streambus_client::{ClientBuilder, Offset};
use streambus_core::{
    AuthenticateResponse, FetchResponse, FetchTrailer, FrameDecoder, Message, MessageSetBuilder,
    ProduceRequest, Request, RequestFrame, Response, Status, Text, Topic, encode_response,
    request_encoded_len, response_encoded_len,
};
use streambus_server::RuntimeKind;
use streambus_server::auth::token_sha256_hex;
use streambus_tests::broker_config;

/// QEMU runs under `timeout` with this bound: a device that hangs fails the test.
const QEMU_TIMEOUT: Duration = Duration::from_secs(60);
/// The firmware's request timeout (`REQUEST_TIMEOUT` in examples/mps2-an386/src/main.rs).
const DEVICE_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The firmware's record sizes (`SIZES`), and the 1 KiB record it sends in between.
const SIZES: [usize; 5] = [1, 100, 1000, 2048, 4000];
const SMALL: usize = 1024;
/// The firmware's idempotent batch (`BATCH`): one produce, sent twice.
const BATCH: [usize; 3] = [10, 300, 1500];
/// The firmware's token (`TOKEN`) and the principal the broker's auth file gives it.
const TOKEN: &str = "mps2-an386-device-token";
const PRINCIPAL: &str = "device";

/// Byte `i` of record `k`'s value in round `round`, as the firmware writes it.
fn value_byte(round: u8, k: usize, i: usize) -> u8 {
    ((7 * i + 31 * k + 101 * usize::from(round)) % 251) as u8
}

/// The (key, value) of every record the firmware writes, in order: round `b` (blocking
/// client), the 1 KiB record `m`, the idempotent batch `i` (once, though sent twice), round
/// `a` (async client).
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
    all.extend(round(b'i', &BATCH));
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

/// The device's line for the 1 KiB record at `offset`: the smallest buffers that carry it,
/// as the core's encoders size them.
fn small_record_line(offset: i64) -> String {
    let key = [b'm', b'0'];
    let value: Vec<u8> = (0..SMALL).map(|i| value_byte(b'm', 0, i)).collect();
    let mut set = vec![0u8; 2 * SMALL];
    let mut builder = MessageSetBuilder::new(&mut set);
    builder.push(&Message::new(&key, &value)).unwrap();
    let messages = builder.finish();
    let topic = Topic::new("mcu").unwrap();
    let tx = request_encoded_len(&Request::Produce(ProduceRequest {
        topic,
        partition: 0,
        messages,
        producer: None,
    }));
    let rx = response_encoded_len(&Response::Fetch(FetchResponse {
        high_water_mark: 0,
        messages,
        trailer: Some(FetchTrailer::default()),
    }));
    format!("1 KiB record with tx {tx} B, rx {rx} B: produced at {offset}, fetched back, equal")
}

/// The device's lines on stdout, in order, for a broker whose log was empty: offsets follow
/// from [`SIZES`], [`SMALL`] and [`BATCH`].
fn expected_lines() -> Vec<String> {
    let n = SIZES.len() as i64;
    let b_offsets: Vec<i64> = (0..n).collect();
    let idem = n + 1;
    let end_idem = idem + BATCH.len() as i64;
    let a_offsets: Vec<i64> = (end_idem..end_idem + n).collect();
    vec![
        format!("authenticate: principal {PRINCIPAL}"),
        format!("create_topic mcu: created true"),
        format!("blocking: produced {SIZES:?} B at offsets {b_offsets:?}"),
        format!("blocking: fetched {} records back, equal", SIZES.len()),
        format!("blocking: mcu/0 offsets start 0 end {n}"),
        small_record_line(n),
        format!(
            "idempotent: batch of {} at offset {idem}, sequence 0 -> {}",
            BATCH.len(),
            BATCH.len()
        ),
        format!("idempotent: retry got offset {idem}, mcu/0 end {end_idem}: appended once"),
        format!("async: produced {SIZES:?} B at offsets {a_offsets:?}"),
        format!("async: fetched {} records back, equal", SIZES.len()),
        format!("async: mcu/0 offsets start 0 end {}", end_idem + n),
    ]
}

#[test]
#[ignore = "needs qemu-system-arm and the thumbv7em-none-eabihf target (.ci/run runs it)"]
fn the_device_authenticates_produces_idempotently_and_its_records_read_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[principals]\n{PRINCIPAL} = {{ token_sha256 = \"{}\", produce = [\"mcu\"], \
             consume = [\"mcu\"], admin = [\"mcu\"] }}\n",
            token_sha256_hex(TOKEN)
        ),
    )
    .unwrap();
    let mut config = broker_config(&dir.path().join("data"), RuntimeKind::Tokio);
    config.auth_file = Some(auth);
    let broker = streambus_server::start(config).expect("broker starts");
    let run = run_device(broker.addr());
    assert_eq!(run.code, Some(0), "the device reported a failure");

    // The exact report: the first line (client sizes) and the last (time) vary by build and run.
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("streambus on mps2-an386: client state ")),
        "{}",
        run.stdout
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("ok in ") && l.ends_with(" ms")),
        "{}",
        run.stdout
    );
    assert_eq!(
        lines[1..lines.len() - 1],
        expected_lines(),
        "{}",
        run.stdout
    );

    let client = Client::connect_with(
        ClientBuilder::default().token(TOKEN),
        broker.addr().to_string(),
    )
    .unwrap();
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
    // The retried batch is there once: nothing after the last record.
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

/// The whole reply to the device's first request (an Authenticate).
fn authenticate_reply(request: &[u8]) -> Vec<u8> {
    let id = RequestFrame::new_checked(request).unwrap().request_id();
    let reply = Response::Authenticate(AuthenticateResponse {
        principal: Text(PRINCIPAL.as_bytes()),
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
        let reply = authenticate_reply(request);
        s.write_all(&reply[..reply.len() / 2]).unwrap();
        // Dropping `s` closes the connection; the UART can't tell, so the deadline must.
    });
    let run = run_device(addr);
    assert_eq!(run.code, Some(1), "the device reports the failure");
    assert!(
        run.stdout
            .contains("error: authenticate: request 1 timed out"),
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
    let want = "error: authenticate: protocol violation by the broker: bad response: \
                frame length 1213486160 exceeds the maximum 10485760";
    assert!(run.stdout.contains(want), "{}", run.stdout);

    // A reply whose last CRC byte is damaged.
    let addr = fake_broker(|mut s, request| {
        let mut reply = authenticate_reply(request);
        if let Some(b) = reply.last_mut() {
            *b ^= 0xff;
        }
        s.write_all(&reply).unwrap();
        wait_for_close(s);
    });
    let run = run_device(addr);
    assert_eq!(run.code, Some(1), "the device reports the failure");
    let want = "error: authenticate: protocol violation by the broker: bad response: \
                CRC mismatch in request 1";
    assert!(run.stdout.contains(want), "{}", run.stdout);
}
