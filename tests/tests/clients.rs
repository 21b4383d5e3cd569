//! The adapters' client side: the core's one driver over tokio, smol and std sockets, against
//! the real broker, and request timeouts against a silent peer.

use std::time::Duration;

use streambus_core::io::DriverError;
use streambus_core::{
    ClientConfig, FetchRequest, MessageSet, ProduceRequest, Request, RequestType, Response, Text,
    Topic,
};
use streambus_server::{Config, FsyncMode, RuntimeKind};
use streambus_tests::message_set;

fn broker(dir: &std::path::Path) -> streambus_server::Running {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.runtime = RuntimeKind::Tokio;
    c.fsync = FsyncMode::Never;
    streambus_server::start(c).unwrap()
}

fn config(timeout_ms: u64) -> ClientConfig {
    let mut c = ClientConfig::default();
    c.request_timeout(Duration::from_millis(timeout_ms));
    c
}

const BUF: usize = 1 << 20;

fn produce_req<'a>(topic: &'a str, set: &'a (u32, Vec<u8>)) -> Request<'a> {
    Request::Produce(ProduceRequest {
        topic: Topic::new(topic).unwrap(),
        partition: 0,
        messages: MessageSet::new_checked(set.0, &set.1).unwrap(),
        producer: None,
    })
}

fn fetch_req(topic: &str) -> Request<'_> {
    Request::Fetch(FetchRequest {
        topic: Topic::new(topic).unwrap(),
        partition: 0,
        offset: 0,
        max_bytes: 1 << 20,
        extension: None,
    })
}

fn values(r: &Response<'_>) -> Vec<Vec<u8>> {
    match r {
        Response::Fetch(f) => f.messages.iter().map(|m| m.value.to_vec()).collect(),
        other => panic!("{other:?}"),
    }
}

/// A listener that accepts and never answers.
fn silent_peer() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        drop(s);
    });
    (addr, t)
}

#[test]
fn tokio_client() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = streambus_adapters::tokio::connect::<8>(b.addr(), config(5_000), BUF).await.unwrap();
        let r = c.request(&Request::HealthCheck).await.unwrap();
        assert!(matches!(r, Response::HealthCheck(h) if h.status == Text(b"healthy")));
        let set = message_set(&[b"a", b"b"]);
        assert!(matches!(c.request(&produce_req("tk", &set)).await.unwrap(), Response::Produce(p) if p.num_messages == 2));
        // Pipelined: several in flight, completions by id.
        let ids: Vec<u64> = {
            let mut ids = Vec::new();
            for _ in 0..5 {
                ids.push(c.send(&produce_req("tk", &set)).await.unwrap());
            }
            ids
        };
        let mut done = Vec::new();
        for _ in 0..5 {
            let d = c.next_completion().await.unwrap();
            assert!(!d.timed_out);
            assert!(matches!(c.response(RequestType::Produce), Some(Response::Produce(_))));
            done.push(d.request_id);
        }
        done.sort_unstable();
        assert_eq!(done, ids);
        assert_eq!(values(&c.request(&fetch_req("tk")).await.unwrap()).len(), 12);

        let (addr, t) = silent_peer();
        let mut s = streambus_adapters::tokio::connect::<8>(addr, config(200), 4096).await.unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(s.request(&Request::HealthCheck).await, Err(DriverError::TimedOut { .. })));
        assert!(started.elapsed() >= Duration::from_millis(200));
        t.join().unwrap();
    });
}

#[test]
fn smol_client() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    smol::block_on(async {
        let mut c = streambus_adapters::smol::connect::<8>(b.addr(), config(5_000), BUF)
            .await
            .unwrap();
        assert!(matches!(
            c.request(&Request::HealthCheck).await.unwrap(),
            Response::HealthCheck(_)
        ));
        let set = message_set(&[b"x"]);
        assert!(
            matches!(c.request(&produce_req("sm", &set)).await.unwrap(), Response::Produce(p) if p.base_offset == 0)
        );
        assert_eq!(
            values(&c.request(&fetch_req("sm")).await.unwrap()),
            vec![b"x".to_vec()]
        );

        let (addr, t) = silent_peer();
        let mut s = streambus_adapters::smol::connect::<8>(addr, config(200), 4096)
            .await
            .unwrap();
        assert!(matches!(
            s.request(&Request::HealthCheck).await,
            Err(DriverError::TimedOut { .. })
        ));
        t.join().unwrap();
    });
}

#[test]
fn blocking_client() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let mut c = streambus_adapters::blocking::connect::<8>(b.addr(), config(5_000), BUF).unwrap();
    assert!(matches!(
        c.request(&Request::HealthCheck).unwrap(),
        Response::HealthCheck(_)
    ));
    let set = message_set(&[b"p", b"q", b"r"]);
    assert!(
        matches!(c.request(&produce_req("bl", &set)).unwrap(), Response::Produce(p) if p.high_water_mark == 3)
    );
    assert_eq!(
        values(&c.request(&fetch_req("bl")).unwrap()),
        vec![b"p".to_vec(), b"q".to_vec(), b"r".to_vec()]
    );

    let (addr, t) = silent_peer();
    let mut s = streambus_adapters::blocking::connect::<8>(addr, config(200), 4096).unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        s.request(&Request::HealthCheck),
        Err(DriverError::TimedOut { .. })
    ));
    assert!(started.elapsed() >= Duration::from_millis(200));
    t.join().unwrap();
}

/// Separate buffer sizes: a 256-byte transmit buffer sends small requests and receives a
/// 64 KiB fetch into its 1 MiB receive buffer; a request larger than the transmit buffer is
/// refused with the size it needs, and the connection goes on.
#[test]
fn separate_transmit_and_receive_buffers() {
    use streambus_adapters::Buffers;
    use streambus_core::ClientError;
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let big = vec![b'x'; 64 << 10];
    let set = message_set(&[&big]);
    let mut loader =
        streambus_adapters::blocking::connect::<8>(b.addr(), config(5_000), BUF).unwrap();
    assert!(matches!(
        loader.request(&produce_req("split", &set)).unwrap(),
        Response::Produce(_)
    ));

    let bufs = Buffers { tx: 256, rx: BUF };
    let mut c = streambus_adapters::blocking::connect::<8>(b.addr(), config(5_000), bufs).unwrap();
    let r = c.request(&fetch_req("split")).unwrap();
    assert_eq!(values(&r), vec![big.clone()]);
    let too_big = c.request(&produce_req("split", &set)).unwrap_err();
    let need = streambus_core::request_encoded_len(&produce_req("split", &set));
    assert!(
        matches!(too_big, DriverError::Client(ClientError::BufferTooSmall { required }) if required == need),
        "{too_big:?}"
    );
    assert!(matches!(
        c.request(&Request::HealthCheck).unwrap(),
        Response::HealthCheck(_)
    ));
}
