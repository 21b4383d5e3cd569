//! A small client for `no_std` firmware: authenticate with a token, produce, fetch,
//! get-offset, create-topic and health-check, one request at a time, over the
//! [`io`](crate::io) drivers and two caller
//! buffers.
//!
//! ```text
//! let mut client = blocking::Client::new(uart, clock, ClientConfig::default(), &mut tx[..], &mut rx[..]);
//! let mut records = [0u8; 64];
//! let mut set = MessageSetBuilder::new(&mut records);
//! set.push(&Message::new(b"temp", b"21.5"))?;
//! let ack = client.produce(Topic::new("sensors")?, 0, set.finish())?;
//! ```
//!
//! A broker with authentication on wants `client.authenticate(token)?` first (no TLS on the
//! MCU: the link must be trusted).
//!
//! `tx` must hold the largest request (a Produce: 16 + 4 + topic + 8 + records + 4 bytes; an
//! Authenticate: 33 + the token's length);
//! `rx` the largest response (a Fetch: 47 bytes + up to `max_bytes` of records).

use core::fmt;

use crate::io::{Call, DriverError};
use crate::wire::Payload;
use crate::wire::message::MessageSet;
use crate::wire::request::{
    AuthenticateRequest, CreateTopicRequest, FetchRequest, GetOffsetRequest, ProduceRequest,
    ProducerInfo,
};
use crate::wire::response::{
    AuthenticateResponse, CreateTopicResponse, FetchResponse, GetOffsetResponse,
    HealthCheckResponse, PayloadParser, ProduceResponse, Response, parse_authenticate,
    parse_create_topic, parse_fetch, parse_get_offset, parse_health_check, parse_produce,
};
use crate::wire::types::{ErrorCode, RequestType, Topic};

/// Why an embedded client call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error<E> {
    /// The transport or the connection failed (see [`DriverError`]).
    Driver(DriverError<E>),
    /// The broker answered with an error reply.
    Broker {
        /// The error code.
        code: ErrorCode,
    },
}

impl<E> From<DriverError<E>> for Error<E> {
    fn from(e: DriverError<E>) -> Self {
        Self::Driver(e)
    }
}

impl<E: fmt::Debug> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Driver(e) => fmt::Display::fmt(e, f),
            Self::Broker { code } => write!(f, "broker replied with error {code:?}"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Error<E> {}

/// Idempotent produce (protocol §6.2) to one partition: the producer id and epoch the caller
/// gives (a device serial and a boot counter kept across restarts, say) and the sequence of the
/// next batch, which [`produce_idempotent`](blocking::Client::produce_idempotent) advances.
///
/// Nothing of a batch is kept: to retry one whose outcome is unknown (a transport error or a
/// timeout), call `produce_idempotent` again with the same state and the same records, still
/// in the caller's buffer; the broker appends it once and answers the retry with the original
/// offsets. Keep one `Sequence` per partition written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Sequence {
    /// The producer id, > 0.
    pub producer_id: i64,
    /// The epoch, ≥ 0; a restarted device must use a higher one (or another id).
    pub epoch: i16,
    /// The next batch's base sequence (0 in a new epoch).
    pub next: i32,
}

impl Sequence {
    /// A producer's state at the start of `epoch`.
    pub const fn new(producer_id: i64, epoch: i16) -> Self {
        Self {
            producer_id,
            epoch,
            next: 0,
        }
    }

    /// After a reply to a batch of `count` messages: on success the sequence moves past the
    /// batch; after `OutOfOrderSequence` or `UnknownProducer` a new epoch starts at 0 (the
    /// batches whose reply was lost before are then of unknown fate).
    fn answered<T, E>(&mut self, count: u32, r: &Result<T, Error<E>>) {
        match r {
            // Sequences wrap after i32::MAX to 0: 2^32 is a multiple of 2^31.
            Ok(_) => self.next = ((self.next as u32).wrapping_add(count) & 0x7fff_ffff) as i32,
            Err(Error::Broker {
                code: ErrorCode::OUT_OF_ORDER_SEQUENCE | ErrorCode::UNKNOWN_PRODUCER,
            }) => *self = Self::new(self.producer_id, self.epoch.saturating_add(1)),
            Err(_) => {}
        }
    }
}

fn idempotent_request<'a>(
    seq: &Sequence,
    topic: Topic<'a>,
    partition: u32,
    messages: MessageSet<'a>,
) -> ProduceRequest<'a> {
    ProduceRequest {
        topic,
        partition,
        messages,
        producer: Some(ProducerInfo {
            producer_id: seq.producer_id,
            producer_epoch: seq.epoch,
            base_sequence: Some(seq.next),
        }),
    }
}

/// Picks the expected variant; a broker error reply becomes [`Error::Broker`]. The connection
/// decodes a response by its request's type, so no other variant can arrive.
fn pick<'a, T, E>(
    response: Response<'a>,
    want: impl FnOnce(Response<'a>) -> Option<T>,
) -> Result<T, Error<E>> {
    match response {
        Response::Error(e) => Err(Error::Broker { code: e.code }),
        other => want(other).ok_or(Error::Broker {
            code: ErrorCode::UNKNOWN_REQUEST,
        }),
    }
}

/// The call of one request type: its payload and its reply's decoder, named by each method
/// (not dispatched on the [`RequestType`] at run time) so that a firmware links the codecs of
/// the calls it makes and no others. A new method does the same (its request struct with an
/// `Encode` impl, its `parse_*` function); going through `Driver::request(&Request)` instead
/// would link all seven codecs, about 1 KiB more (`scripts/footprint.sh` gates it).
fn call<'r>(request_type: RequestType, payload: &'r dyn Payload, parse: PayloadParser) -> Call<'r> {
    Call {
        request_type,
        payload,
        parse,
    }
}

macro_rules! client_methods {
    ($($async:ident)?; $($await:ident)?) => {
        /// Appends `messages` (build them with [`MessageSetBuilder`](crate::MessageSetBuilder))
        /// to a partition.
        pub $($async)? fn produce(
            &mut self,
            topic: Topic<'_>,
            partition: u32,
            messages: MessageSet<'_>,
        ) -> Result<ProduceResponse, Error<T::Error>> {
            let req = ProduceRequest {
                topic,
                partition,
                messages,
                producer: None,
            };
            let call = call(RequestType::Produce, &req, parse_produce);
            let r = self.driver.call(call) $(.$await)??;
            pick(r, |r| match r {
                Response::Produce(p) => Some(p),
                _ => None,
            })
        }

        /// [`produce`](Self::produce) with idempotence (protocol §6.2): sends `seq`'s producer
        /// id, epoch and next sequence, and advances `seq` by the reply (see [`Sequence`]).
        /// A retry of a batch whose reply was lost gets the original offsets.
        pub $($async)? fn produce_idempotent(
            &mut self,
            seq: &mut Sequence,
            topic: Topic<'_>,
            partition: u32,
            messages: MessageSet<'_>,
        ) -> Result<ProduceResponse, Error<T::Error>> {
            let count = messages.count();
            let req = idempotent_request(seq, topic, partition, messages);
            let r = match self.driver.call(call(RequestType::Produce, &req, parse_produce)) $(.$await)? {
                Ok(r) => pick(r, |r| match r {
                    Response::Produce(p) => Some(p),
                    _ => None,
                }),
                Err(e) => Err(e.into()),
            };
            seq.answered(count, &r);
            r
        }

        /// Reads messages from `offset` on, about `max_bytes` of them; borrowed from the
        /// receive buffer.
        pub $($async)? fn fetch(
            &mut self,
            topic: Topic<'_>,
            partition: u32,
            offset: i64,
            max_bytes: u32,
        ) -> Result<FetchResponse<'_>, Error<T::Error>> {
            let req = FetchRequest {
                topic,
                partition,
                offset,
                max_bytes,
                extension: None,
            };
            let r = self.driver.call(call(RequestType::Fetch, &req, parse_fetch)) $(.$await)??;
            pick(r, |r| match r {
                Response::Fetch(f) => Some(f),
                _ => None,
            })
        }

        /// A partition's start and end offsets.
        pub $($async)? fn get_offset(
            &mut self,
            topic: Topic<'_>,
            partition: u32,
        ) -> Result<GetOffsetResponse<'_>, Error<T::Error>> {
            let req = GetOffsetRequest { topic, partition };
            let call = call(RequestType::GetOffset, &req, parse_get_offset);
            let r = self.driver.call(call) $(.$await)??;
            pick(r, |r| match r {
                Response::GetOffset(g) => Some(g),
                _ => None,
            })
        }

        /// Creates a topic with `num_partitions` partitions; `created` is `false` when it
        /// already existed.
        pub $($async)? fn create_topic(
            &mut self,
            topic: Topic<'_>,
            num_partitions: u32,
        ) -> Result<CreateTopicResponse<'_>, Error<T::Error>> {
            let req = CreateTopicRequest {
                topic,
                num_partitions,
                replication_factor: 1,
            };
            let call = call(RequestType::CreateTopic, &req, parse_create_topic);
            let r = self.driver.call(call) $(.$await)??;
            pick(r, |r| match r {
                Response::CreateTopic(c) => Some(c),
                _ => None,
            })
        }

        /// Authenticates the connection with `token` (§6.3, mechanism `token`); the reply names
        /// the principal. A refused token is [`Error::Broker`] with code 40
        /// (AuthenticationFailed); the third refusal in a row closes the connection.
        pub $($async)? fn authenticate(
            &mut self,
            token: &[u8],
        ) -> Result<AuthenticateResponse<'_>, Error<T::Error>> {
            let req = AuthenticateRequest::token(token);
            let call = call(RequestType::Authenticate, &req, parse_authenticate);
            let r = self.driver.call(call) $(.$await)??;
            pick(r, |r| match r {
                Response::Authenticate(a) => Some(a),
                _ => None,
            })
        }

        /// The broker's status and uptime.
        pub $($async)? fn health_check(
            &mut self,
        ) -> Result<HealthCheckResponse<'_>, Error<T::Error>> {
            let call = call(RequestType::HealthCheck, &(), parse_health_check);
            let r = self.driver.call(call) $(.$await)??;
            pick(r, |r| match r {
                Response::HealthCheck(h) => Some(h),
                _ => None,
            })
        }
    };
}

/// The client over the blocking driver.
#[cfg(feature = "embedded-io")]
pub mod blocking {
    use super::*;
    use crate::conn::client::{ClientConfig, ClientConnection};
    use crate::io::Clock;
    use crate::io::blocking::Driver;

    /// A one-request-at-a-time client over a blocking transport.
    #[derive(Debug)]
    pub struct Client<T, C, B> {
        driver: Driver<T, C, B, 1>,
    }

    impl<T, C, B> Client<T, C, B>
    where
        T: embedded_io::Read + embedded_io::Write,
        C: Clock,
        B: AsRef<[u8]> + AsMut<[u8]>,
    {
        /// A client over `io`, encoding into `tx` and receiving into `rx`.
        pub fn new(io: T, clock: C, config: ClientConfig, tx: B, rx: B) -> Self {
            Self {
                driver: Driver::new(io, clock, ClientConnection::new(config, tx, rx)),
            }
        }

        /// The driver underneath.
        pub fn driver(&mut self) -> &mut Driver<T, C, B, 1> {
            &mut self.driver
        }

        client_methods!(;);
    }
}

/// The client over the async driver.
#[cfg(feature = "embedded-io-async")]
pub mod asynch {
    use super::*;
    use crate::conn::client::{ClientConfig, ClientConnection};
    use crate::io::asynch::{Driver, Timer};

    /// A one-request-at-a-time client over an async transport.
    #[derive(Debug)]
    pub struct Client<T, C, B> {
        driver: Driver<T, C, B, 1>,
    }

    impl<T, C, B> Client<T, C, B>
    where
        T: embedded_io_async::Read + embedded_io_async::Write,
        C: Timer,
        B: AsRef<[u8]> + AsMut<[u8]>,
    {
        /// A client over `io`, encoding into `tx` and receiving into `rx`.
        pub fn new(io: T, timer: C, config: ClientConfig, tx: B, rx: B) -> Self {
            Self {
                driver: Driver::new(io, timer, ClientConnection::new(config, tx, rx)),
            }
        }

        /// The driver underneath.
        pub fn driver(&mut self) -> &mut Driver<T, C, B, 1> {
            &mut self.driver
        }

        client_methods!(async; await);
    }
}
