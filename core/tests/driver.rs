//! The blocking and async drivers and the embedded client, over an in-memory transport whose
//! far end is a `ServerConnection` plus a tiny broker.

use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};
use core::time::Duration;
use std::cell::Cell;
use std::rc::Rc;

use streambus_core::embedded::{self, Error};
use streambus_core::io::asynch::Timer;
use streambus_core::io::{Clock, DriverError};
use streambus_core::{
    ClientConfig, CreateTopicResponse, ErrorCode, FetchResponse, GetOffsetResponse,
    HealthCheckResponse, Instant, Message, MessageSetBuilder, ProduceResponse, Request, Response,
    ServerConfig, ServerConnection, ServerEvent, Topic,
};

/// The broker end: a server connection, a one-partition log of values, and the bytes it
/// sends back, handed out `chunk` bytes per read.
struct Loopback {
    server: ServerConnection,
    rx: Vec<u8>,
    out: Vec<u8>,
    log: Vec<Vec<u8>>,
    chunk: usize,
    /// Answer nothing (a silent broker).
    silent: bool,
    /// Bytes sent right after each reply, in the same reads (a broker gone wrong).
    after_reply: Vec<u8>,
    /// Answer a HealthCheck with a Produce body (an intact reply that fits no request).
    misfit: bool,
}

impl Loopback {
    fn new(chunk: usize) -> Self {
        Self {
            server: ServerConnection::new(ServerConfig::default(), Instant::ZERO),
            rx: Vec::new(),
            out: Vec::new(),
            log: Vec::new(),
            chunk,
            silent: false,
            after_reply: Vec::new(),
            misfit: false,
        }
    }

    fn serve(&mut self) {
        let mut tx = vec![0u8; 4096];
        loop {
            let ServerEvent::Request {
                consumed,
                request_id: id,
                request,
                ..
            } = self.server.poll_request(Instant::ZERO, &self.rx)
            else {
                return;
            };
            let n = if self.silent {
                0
            } else {
                match request {
                    Request::Produce(p) => {
                        let base = self.log.len() as i64;
                        for m in p.messages.iter() {
                            self.log.push(m.value.to_vec());
                        }
                        let resp = Response::Produce(ProduceResponse {
                            base_offset: base,
                            num_messages: p.messages.count(),
                            high_water_mark: self.log.len() as i64,
                        });
                        self.server.respond(id, &resp, &mut tx).unwrap()
                    }
                    Request::Fetch(f) if f.topic.as_str() == "t" => {
                        let mut records = [0u8; 1024];
                        let mut b = MessageSetBuilder::new(&mut records);
                        for (i, v) in self.log.iter().enumerate().skip(f.offset as usize) {
                            let mut m = Message::new(b"", v);
                            m.offset = i as i64;
                            b.push(&m).unwrap();
                        }
                        let resp = Response::Fetch(FetchResponse {
                            high_water_mark: self.log.len() as i64,
                            messages: b.finish(),
                            trailer: None,
                        });
                        self.server.respond(id, &resp, &mut tx).unwrap()
                    }
                    Request::GetOffset(g) => {
                        let resp = Response::GetOffset(GetOffsetResponse {
                            topic: g.topic,
                            partition: g.partition,
                            start_offset: 0,
                            end_offset: self.log.len() as i64,
                            high_water_mark: self.log.len() as i64,
                        });
                        self.server.respond(id, &resp, &mut tx).unwrap()
                    }
                    Request::CreateTopic(c) => {
                        let resp = Response::CreateTopic(CreateTopicResponse {
                            topic: c.topic,
                            created: c.num_partitions == 1 && c.replication_factor == 1,
                        });
                        self.server.respond(id, &resp, &mut tx).unwrap()
                    }
                    Request::HealthCheck if self.misfit => {
                        // Too short for a HealthCheck body (status, then 8 bytes of uptime).
                        let resp = Response::CreateTopic(CreateTopicResponse {
                            topic: topic(),
                            created: true,
                        });
                        self.server.respond(id, &resp, &mut tx).unwrap()
                    }
                    Request::HealthCheck => {
                        let resp = Response::HealthCheck(HealthCheckResponse {
                            status: "healthy".into(),
                            uptime_secs: 7,
                        });
                        self.server.respond(id, &resp, &mut tx).unwrap()
                    }
                    other => self
                        .server
                        .respond_error(
                            id,
                            ErrorCode::TOPIC_NOT_FOUND,
                            format_args!("topic {} does not exist", other.topic().unwrap()),
                            &mut tx,
                        )
                        .unwrap(),
                }
            };
            self.out.extend_from_slice(&tx[..n]);
            self.out.extend_from_slice(&self.after_reply);
            self.rx.drain(..consumed);
        }
    }

    fn take(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.out.len()).min(self.chunk);
        buf[..n].copy_from_slice(&self.out[..n]);
        self.out.drain(..n);
        n
    }
}

impl embedded_io::ErrorType for Loopback {
    type Error = core::convert::Infallible;
}

impl embedded_io::Read for Loopback {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        // An empty `out` reads as end of stream (the blocking test never waits on a silent
        // broker).
        Ok(self.take(buf))
    }
}

impl embedded_io::Write for Loopback {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let n = buf.len().min(self.chunk);
        self.rx.extend_from_slice(&buf[..n]);
        self.serve();
        Ok(n)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl embedded_io_async::Read for Loopback {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if self.out.is_empty() {
            // A silent peer: never ready.
            core::future::pending::<()>().await;
        }
        Ok(self.take(buf))
    }
}

impl embedded_io_async::Write for Loopback {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        embedded_io::Write::write(self, buf)
    }
    async fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A virtual clock shared with the test; sleeping jumps it to the deadline.
#[derive(Clone, Default)]
struct VirtualClock(Rc<Cell<u64>>);

impl Clock for VirtualClock {
    fn now(&mut self) -> Instant {
        Instant::from_micros(self.0.get())
    }
}

impl Timer for VirtualClock {
    async fn sleep_until(&mut self, deadline: Instant) {
        self.0.set(self.0.get().max(deadline.as_micros()));
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn topic() -> Topic<'static> {
    Topic::new("t").unwrap()
}

#[test]
fn blocking_client_creates_produces_fetches_and_checks_health() {
    for chunk in [1, 3, 7, 4096] {
        let (mut tx, mut rx) = ([0u8; 256], [0u8; 512]);
        let clock = || Instant::ZERO;
        let mut c = embedded::blocking::Client::new(
            Loopback::new(chunk),
            clock,
            ClientConfig::default(),
            &mut tx[..],
            &mut rx[..],
        );
        let created = c.create_topic(topic(), 1).unwrap();
        assert_eq!((created.topic, created.created), (topic(), true));

        let mut records = [0u8; 128];
        let mut set = MessageSetBuilder::new(&mut records);
        set.push(&Message::new(b"k", b"one")).unwrap();
        set.push(&Message::new(b"k", b"two")).unwrap();
        let ack = c.produce(topic(), 0, set.finish()).unwrap();
        assert_eq!(
            (ack.base_offset, ack.num_messages, ack.high_water_mark),
            (0, 2, 2)
        );

        let f = c.fetch(topic(), 0, 1, 1024).unwrap();
        let values: Vec<&[u8]> = f.messages.iter().map(|m| m.value).collect();
        assert_eq!(values, [b"two".as_slice()], "chunk {chunk}");

        let g = c.get_offset(topic(), 0).unwrap();
        assert_eq!((g.start_offset, g.end_offset), (0, 2));

        let h = c.health_check().unwrap();
        assert_eq!((h.status.as_str(), h.uptime_secs), (Some("healthy"), 7));

        assert_eq!(
            c.fetch(Topic::new("other").unwrap(), 0, 0, 10).map(|_| ()),
            Err(Error::Broker {
                code: ErrorCode::TOPIC_NOT_FOUND
            })
        );
        assert_eq!(c.driver().connection().in_flight(), 0);
    }
}

#[test]
fn blocking_driver_reports_end_of_stream() {
    let (mut tx, mut rx) = ([0u8; 64], [0u8; 64]);
    let mut lb = Loopback::new(64);
    lb.silent = true;
    let mut c = embedded::blocking::Client::new(
        lb,
        || Instant::ZERO,
        ClientConfig::default(),
        &mut tx[..],
        &mut rx[..],
    );
    assert_eq!(
        c.health_check().map(|_| ()),
        Err(Error::Driver(DriverError::Closed))
    );
}

#[test]
fn async_client_round_trip() {
    let (mut tx, mut rx) = ([0u8; 256], [0u8; 512]);
    let mut c = embedded::asynch::Client::new(
        Loopback::new(5),
        VirtualClock::default(),
        ClientConfig::default(),
        &mut tx[..],
        &mut rx[..],
    );
    block_on(async {
        let created = c.create_topic(topic(), 1).await.unwrap();
        assert_eq!((created.topic, created.created), (topic(), true));
        let mut records = [0u8; 64];
        let mut set = MessageSetBuilder::new(&mut records);
        set.push(&Message::new(b"", b"hello")).unwrap();
        let ack = c.produce(topic(), 0, set.finish()).await.unwrap();
        assert_eq!(ack.high_water_mark, 1);
        let f = c.fetch(topic(), 0, 0, 100).await.unwrap();
        assert_eq!(f.messages.iter().next().unwrap().value, b"hello");
        assert_eq!(c.health_check().await.unwrap().uptime_secs, 7);
    });
}

#[test]
fn async_driver_times_out_a_silent_broker_at_the_deadline() {
    let (mut tx, mut rx) = ([0u8; 64], [0u8; 64]);
    let mut lb = Loopback::new(64);
    lb.silent = true;
    let clock = VirtualClock::default();
    let mut cfg = ClientConfig::default();
    cfg.request_timeout(Duration::from_millis(250));
    let mut c = embedded::asynch::Client::new(lb, clock.clone(), cfg, &mut tx[..], &mut rx[..]);
    let r = block_on(async { c.health_check().await.map(|_| ()) });
    assert_eq!(
        r,
        Err(Error::Driver(DriverError::TimedOut { request_id: 1 }))
    );
    assert_eq!(clock.0.get(), 250_000, "woke exactly at the deadline");
}

#[test]
fn async_driver_pipelines_queued_requests_and_races_another_future() {
    use streambus_core::io::asynch::{Driver, Wake};
    use streambus_core::{ClientConnection, RequestType};

    let conn: ClientConnection<Vec<u8>, 4> =
        ClientConnection::new(ClientConfig::default(), vec![0; 256], vec![0; 256]);
    let mut d = Driver::new(Loopback::new(7), VirtualClock::default(), conn);
    block_on(async {
        // Nothing in flight: the other future wins (a new request from the application).
        let woke = d.next_completion_or(core::future::ready(42)).await.unwrap();
        assert_eq!(woke, Wake::Other(42));
        let ids: Vec<u64> = (0..3)
            .map(|_| d.queue(&Request::HealthCheck).unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        for id in ids {
            let Wake::Completion(done) = d
                .next_completion_or(core::future::pending::<()>())
                .await
                .unwrap()
            else {
                panic!()
            };
            assert_eq!((done.request_id, done.timed_out), (id, false));
            let Some(Response::HealthCheck(h)) = d.response(RequestType::HealthCheck) else {
                panic!()
            };
            assert_eq!(h.uptime_secs, 7);
        }
        assert_eq!(d.connection().in_flight(), 0);
    });
}

#[test]
fn a_reply_before_a_fault_in_the_same_read_is_handed_out_then_the_error() {
    use streambus_core::{ClientError, DecodeError, PeerError};
    for chunk in [1, 5, 4096] {
        let (mut tx, mut rx) = ([0u8; 64], [0u8; 128]);
        let mut lb = Loopback::new(chunk);
        // A Length below the minimum right behind the reply.
        lb.after_reply = vec![0, 0, 0, 14];
        let mut c = embedded::blocking::Client::new(
            lb,
            || Instant::ZERO,
            ClientConfig::default(),
            &mut tx[..],
            &mut rx[..],
        );
        let h = c.health_check().unwrap();
        assert_eq!(h.uptime_secs, 7, "chunk {chunk}");
        let fault = DriverError::Client(ClientError::Peer(PeerError::Decode(
            DecodeError::FrameTooShort {
                length: 14,
                min: 15,
            },
        )));
        assert_eq!(
            c.health_check().map(|_| ()),
            Err(Error::Driver(fault)),
            "chunk {chunk}"
        );
    }
}

#[test]
fn a_reply_that_fits_no_request_is_a_peer_error_from_both_drivers() {
    use streambus_core::{ClientError, PeerError};
    let is_misfit = |e: &Error<core::convert::Infallible>| {
        matches!(
            e,
            Error::Driver(DriverError::Client(ClientError::Peer(PeerError::Decode(_))))
        )
    };
    let (mut tx, mut rx) = ([0u8; 64], [0u8; 128]);
    let mut lb = Loopback::new(3);
    lb.misfit = true;
    let mut c = embedded::blocking::Client::new(
        lb,
        || Instant::ZERO,
        ClientConfig::default(),
        &mut tx[..],
        &mut rx[..],
    );
    let e = c.health_check().map(|_| ()).unwrap_err();
    assert!(is_misfit(&e), "{e:?}");
    assert!(c.driver().connection().error().is_some(), "poisoned");

    let (mut tx, mut rx) = ([0u8; 64], [0u8; 128]);
    let mut lb = Loopback::new(3);
    lb.misfit = true;
    let mut c = embedded::asynch::Client::new(
        lb,
        VirtualClock::default(),
        ClientConfig::default(),
        &mut tx[..],
        &mut rx[..],
    );
    let e = block_on(async { c.health_check().await.map(|_| ()) }).unwrap_err();
    assert!(is_misfit(&e), "{e:?}");
}
