//! Support for the end-to-end tests: a raw v1 client over a std socket (built on the core
//! codec only, so it tests the server independently of any client SDK), and helpers to start
//! servers on every runtime.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub mod tls;

use tls::Conn;

use streambus_core::{
    DecodeError, Flags, FrameDecoder, Request, RequestType, Response, ResponseFrame, Status,
    encode_request, request_encoded_len,
};

/// The runtimes every end-to-end test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// tokio.
    Tokio,
    /// smol.
    Smol,
    /// std threads.
    Blocking,
}

/// All three runtimes.
pub const RUNTIMES: [Runtime; 3] = [Runtime::Tokio, Runtime::Smol, Runtime::Blocking];

/// One response frame as read: owned bytes, parsed on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply(pub Vec<u8>);

impl Reply {
    /// The checked frame view.
    pub fn frame(&self) -> ResponseFrame<&[u8]> {
        ResponseFrame::new_checked(&self.0[..]).expect("the server sent a bad frame")
    }

    /// The RequestID answered.
    pub fn request_id(&self) -> u64 {
        self.frame().request_id()
    }

    /// The response, decoded as a reply to `ty`.
    pub fn parse(&self, ty: RequestType) -> Result<Response<'_>, DecodeError> {
        Response::parse(&ResponseFrame::new_checked(&self.0[..])?, ty)
    }

    /// The error code (0 on success).
    pub fn error_code(&self) -> u16 {
        self.frame().error_code().0
    }
}

/// A blocking v1 client that speaks raw frames.
#[derive(Debug)]
pub struct RawClient {
    stream: Option<Conn>,
    /// Receive buffer: `buf[start..end]` holds bytes received and not yet handed out. It is
    /// zero-filled only when it grows, so a reply costs no allocation and no memset.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    next_id: u64,
}

impl RawClient {
    /// Connects, with a 10 s read timeout so a silent server fails the test instead of hanging.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: Some(Conn::Plain(stream)),
            buf: Vec::new(),
            start: 0,
            end: 0,
            next_id: 1,
        })
    }

    /// Connects over TLS with `config` (to a server named `localhost`) and completes the
    /// handshake, with a 10 s read timeout.
    pub fn connect_tls(
        addr: SocketAddr,
        config: std::sync::Arc<streambus_adapters::tls::rustls::ClientConfig>,
    ) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: Some(Conn::tls(stream, config)?),
            buf: Vec::new(),
            start: 0,
            end: 0,
            next_id: 1,
        })
    }

    /// Wraps a connected stream.
    pub fn from_stream(stream: TcpStream) -> Self {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_nodelay(true);
        Self {
            stream: Some(Conn::Plain(stream)),
            buf: Vec::new(),
            start: 0,
            end: 0,
            next_id: 1,
        }
    }

    /// A client with no connection, only for encoding frames.
    pub fn connect_lazy() -> Self {
        Self {
            stream: None,
            buf: Vec::new(),
            start: 0,
            end: 0,
            next_id: 1,
        }
    }

    /// The connection alone, without the client's receive buffer (to hold many connections
    /// open at no cost to this process's heap).
    pub fn into_conn(self) -> Option<Conn> {
        self.stream
    }

    fn stream(&mut self) -> io::Result<&mut Conn> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no stream"))
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream()?.write_all(bytes)
    }

    /// Encodes a request frame with a fresh id.
    pub fn encode(&mut self, request: &Request<'_>) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut buf = vec![0; request_encoded_len(request)];
        encode_request(id, Flags::REQUIRE_ACK, request, &mut buf).expect("encode");
        (id, buf)
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, request: &Request<'_>) -> io::Result<u64> {
        let (id, bytes) = self.encode(request);
        self.send_raw(&bytes)?;
        Ok(id)
    }

    /// Reads one response frame (`UnexpectedEof` when the server closed).
    pub fn recv(&mut self) -> io::Result<Reply> {
        Ok(Reply(self.recv_frame()?.to_vec()))
    }

    /// Reads one response frame and lends it out of the receive buffer (no copy); the next
    /// call reuses that space.
    pub fn recv_frame(&mut self) -> io::Result<&[u8]> {
        let decoder = FrameDecoder::responses().with_max_frame_len(64 * 1024 * 1024);
        loop {
            match decoder.next_frame(&self.buf[self.start..self.end]) {
                Ok(Status::Complete(n)) => {
                    let at = self.start;
                    self.start += n;
                    return Ok(&self.buf[at..at + n]);
                }
                Ok(Status::Partial(need)) => self.make_room(need),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let stream = self
                .stream
                .as_mut()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
            let n = stream.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }

    /// Makes at least `need` bytes (and at least 64 KiB) free after the unconsumed data.
    fn make_room(&mut self, need: usize) {
        let want = need.max(64 * 1024);
        if self.buf.len() - self.end >= want {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Sends a request and reads the next reply, checking it answers this request.
    pub fn call(&mut self, request: &Request<'_>) -> io::Result<Reply> {
        let id = self.send(request)?;
        let reply = self.recv()?;
        assert_eq!(reply.request_id(), id, "reply to another request");
        Ok(reply)
    }

    /// Shuts the write side (the server sees EOF after what was sent).
    pub fn shutdown_write(&mut self) {
        if let Ok(s) = self.stream() {
            let _ = s.tcp().shutdown(std::net::Shutdown::Write);
        }
    }

    /// Whether the server closed the connection (EOF within the read timeout).
    pub fn is_closed_by_peer(&mut self) -> bool {
        let mut b = [0u8; 1];
        let Ok(stream) = self.stream() else {
            return true;
        };
        match stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
        }
    }
}

/// A server started by [`serve`] on one runtime; stops when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// Graceful stop; waits for the server thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Serves `handler` on 127.0.0.1, port 0, with the given runtime.
pub fn serve<H: streambus_adapters::Handler>(
    runtime: Runtime,
    handler: std::sync::Arc<H>,
    options: streambus_adapters::ServeOptions,
) -> TestServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, thread): (Box<dyn FnOnce() + Send>, _) = match runtime {
        Runtime::Tokio => {
            let (tx, rx) = smol::channel::bounded::<()>(1);
            let t = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    listener.set_nonblocking(true).unwrap();
                    let l = tokio::net::TcpListener::from_std(listener).unwrap();
                    streambus_adapters::tokio::serve(l, handler, options, async move {
                        let _ = rx.recv().await;
                    })
                    .await
                    .unwrap();
                });
            });
            (
                Box::new(move || {
                    tx.close();
                }),
                t,
            )
        }
        Runtime::Smol => {
            let (tx, rx) = smol::channel::bounded::<()>(1);
            let t = std::thread::spawn(move || {
                let l = smol::Async::new(listener).unwrap();
                smol::block_on(streambus_adapters::smol::serve(
                    l,
                    handler,
                    options,
                    async move {
                        let _ = rx.recv().await;
                    },
                ))
                .unwrap();
            });
            (
                Box::new(move || {
                    tx.close();
                }),
                t,
            )
        }
        Runtime::Blocking => {
            let h = streambus_adapters::blocking::shutdown_handle(&listener).unwrap();
            let h2 = h.clone();
            let t = std::thread::spawn(move || {
                streambus_adapters::blocking::serve(listener, handler, options, h2).unwrap()
            });
            (Box::new(move || h.trigger()), t)
        }
    };
    TestServer {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Encodes `values` as a message set (key `k<i>`, timestamp 0) into an owned buffer.
pub fn message_set(values: &[&[u8]]) -> (u32, Vec<u8>) {
    use streambus_core::{Encode, Message, MessageSetBuilder};
    let msgs: Vec<Message<'_>> = values.iter().map(|v| Message::new(b"", v)).collect();
    let mut buf = vec![0u8; msgs.iter().map(Encode::encoded_len).sum()];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &msgs {
        b.push(m).expect("sized exactly");
    }
    let count = b.count();
    (count, buf)
}

/// Produce `values` to `topic`/`partition`; returns the reply.
pub fn produce(
    c: &mut RawClient,
    topic: &str,
    partition: u32,
    values: &[&[u8]],
) -> io::Result<Reply> {
    use streambus_core::{MessageSet, ProduceRequest, Topic};
    let (count, bytes) = message_set(values);
    let messages = MessageSet::new_checked(count, &bytes).expect("valid set");
    let req = Request::Produce(ProduceRequest {
        topic: Topic::new(topic).expect("valid topic"),
        partition,
        messages,
        producer: None,
    });
    c.call(&req)
}

/// Sends a Produce of `values` to `topic`/`partition` without waiting for its reply; returns
/// its request id (the reply is read with [`RawClient::recv`]).
pub fn send_produce(
    c: &mut RawClient,
    topic: &str,
    partition: u32,
    values: &[&[u8]],
) -> io::Result<u64> {
    use streambus_core::{MessageSet, ProduceRequest, Topic};
    let (count, bytes) = message_set(values);
    let messages = MessageSet::new_checked(count, &bytes).expect("valid set");
    c.send(&Request::Produce(ProduceRequest {
        topic: Topic::new(topic).expect("valid topic"),
        partition,
        messages,
        producer: None,
    }))
}

/// Encodes an idempotent Produce (protocol §6.2) of `values` with the given producer fields.
pub fn idempotent_produce(
    c: &mut RawClient,
    topic: &str,
    partition: u32,
    values: &[&[u8]],
    producer: streambus_core::ProducerInfo,
) -> (u64, Vec<u8>) {
    use streambus_core::{MessageSet, ProduceRequest, Topic};
    let (count, bytes) = message_set(values);
    let messages = MessageSet::new_checked(count, &bytes).expect("valid set");
    let req = Request::Produce(ProduceRequest {
        topic: Topic::new(topic).expect("valid topic"),
        partition,
        messages,
        producer: Some(producer),
    });
    c.encode(&req)
}

/// The producer fields of an idempotent Produce.
pub fn producer(id: i64, epoch: i16, base_sequence: i32) -> streambus_core::ProducerInfo {
    streambus_core::ProducerInfo {
        producer_id: id,
        producer_epoch: epoch,
        base_sequence: Some(base_sequence),
    }
}

/// Fetch from `offset`; returns the reply.
pub fn fetch(
    c: &mut RawClient,
    topic: &str,
    partition: u32,
    offset: i64,
    max_bytes: u32,
) -> io::Result<Reply> {
    use streambus_core::{FetchRequest, Topic};
    let req = Request::Fetch(FetchRequest {
        topic: Topic::new(topic).expect("valid topic"),
        partition,
        offset,
        max_bytes,
        extension: None,
    });
    c.call(&req)
}

/// Every (offset, value) of a partition from `from`, fetching until the high-water mark.
pub fn fetch_all(
    c: &mut RawClient,
    topic: &str,
    partition: u32,
    from: i64,
) -> io::Result<Vec<(i64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut offset = from;
    loop {
        let reply = fetch(c, topic, partition, offset, 1 << 20)?;
        let Response::Fetch(f) = reply
            .parse(RequestType::Fetch)
            .map_err(|e| io::Error::other(e.to_string()))?
        else {
            return Err(io::Error::other(format!(
                "fetch failed with code {}",
                reply.error_code()
            )));
        };
        for m in f.messages.iter() {
            out.push((m.offset, m.value.to_vec()));
        }
        let next = f.trailer.map_or(offset, |t| t.next_offset);
        if next >= f.high_water_mark || f.messages.is_empty() {
            return Ok(out);
        }
        offset = next;
    }
}

/// The settings of a test broker: 127.0.0.1 on port 0, data in `dir`, no metrics listener,
/// `--fsync never`, the given runtime.
pub fn broker_config(
    dir: &std::path::Path,
    runtime: streambus_server::RuntimeKind,
) -> streambus_server::Config {
    let mut c = streambus_server::Config::default();
    c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.runtime = runtime;
    c.fsync = streambus_server::FsyncMode::Never;
    c
}

/// A broker started in this process with [`broker_config`].
pub fn start_broker(
    dir: &std::path::Path,
    runtime: streambus_server::RuntimeKind,
) -> streambus_server::Running {
    streambus_server::start(broker_config(dir, runtime)).expect("broker starts")
}

/// Checks that every acknowledged `(offset, value)` is stored in `topic`/`partition` of the
/// broker at `addr`; `what` names the case in the failure.
pub fn assert_stored(
    addr: SocketAddr,
    topic: &str,
    partition: u32,
    acked: &[(i64, Vec<u8>)],
    what: &str,
) {
    let mut c = RawClient::connect(addr).expect("connect");
    let stored: std::collections::HashMap<i64, Vec<u8>> = fetch_all(&mut c, topic, partition, 0)
        .expect("fetch everything")
        .into_iter()
        .collect();
    for (off, v) in acked {
        assert_eq!(
            stored.get(off),
            Some(v),
            "{what}: acknowledged offset {off} lost"
        );
    }
}

/// The broker's Prometheus text from its metrics listener (`GET /metrics`, HTTP/1.0 so the
/// body ends when the broker closes).
///
/// # Panics
///
/// When the listener cannot be reached or read: a test failure.
pub fn metrics_text(addr: impl std::net::ToSocketAddrs) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics listener");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("send GET /metrics");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read /metrics");
    body
}

/// The value of the unlabelled metric `name` in the broker's metrics, as written (`None`
/// when it is not there).
pub fn metric(addr: impl std::net::ToSocketAddrs, name: &str) -> Option<String> {
    metrics_text(addr)
        .lines()
        .find_map(|l| Some(l.strip_prefix(name)?.strip_prefix(' ')?.trim().to_owned()))
}

/// `n` distinct ports on 127.0.0.1 free now, for listeners whose port must be known before
/// they bind (a cluster's `--peers`). Picked at random below the kernel's ephemeral range
/// (32768 and up), so that no connection's local port takes one between this check and the
/// bind (binding port 0 and dropping the listener hands out an ephemeral port, which an
/// outgoing connection can take meanwhile); a taken port is skipped.
///
/// # Panics
///
/// When no free port turns up in 10 000 tries: a test failure.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::hash::{BuildHasher as _, RandomState};
    let random = RandomState::new();
    let mut listeners: Vec<std::net::TcpListener> = Vec::new();
    let mut tries = 0u64;
    while listeners.len() < n {
        tries += 1;
        assert!(tries < 10_000, "no free port in 20000..32000");
        let port = 20_000 + u16::try_from(random.hash_one(tries) % 12_000).expect("below 12000");
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound listener's address").port())
        .collect()
}

/// Starts this test binary's ignored test `test` as a child process with `env` added: a broker
/// that prints one line `READY <what>` once it serves, then waits on its standard input (a
/// SIGKILL is the test's to send). Returns the child and `<what>` (its address, and whatever
/// else that test prints).
///
/// # Panics
///
/// When the child can't start or exits before its `READY` line: a test failure.
pub fn spawn_child_broker<K, V>(
    test: &str,
    env: impl IntoIterator<Item = (K, V)>,
) -> (std::process::Child, String)
where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--ignored", "--nocapture"])
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child broker");
    let out = child.stdout.take().expect("the child's stdout");
    for line in std::io::BufReader::new(out).lines() {
        let line = line.expect("read the child's stdout");
        if let Some(rest) = line.strip_prefix("READY ") {
            return (child, rest.to_owned());
        }
    }
    let status = child.wait();
    panic!("the child broker exited before it was ready: {status:?}");
}
