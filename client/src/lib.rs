//! # streambus-client
//!
//! The StreamBus client SDK: a [`Client`] with a pool of pipelined connections and the admin
//! calls, a batching [`Producer`], a long-polling [`Consumer`], and the same API
//! synchronously in [`blocking`]. Everything protocol-related (framing, byte order, CRC,
//! codecs) is done by `streambus-core`; this crate only moves owned values between callers
//! and connection tasks.
//!
//! ## Quickstart
//!
//! ```no_run
//! use streambus_client::{Client, Consumer, Offset, Producer, Record};
//!
//! # async fn demo() -> Result<(), streambus_client::Error> {
//! let client = Client::connect("127.0.0.1:9092").await?;
//! client.create_topic("orders", 3).await?;
//!
//! let producer = Producer::new(&client);
//! let at = producer.send(Record::new("orders", "hello").key("customer-7")).await?;
//! println!("stored at {}/{}", at.partition, at.offset);
//!
//! let mut consumer = Consumer::new(&client);
//! consumer.assign("orders", at.partition, Offset::Earliest).await?;
//! for record in consumer.poll(std::time::Duration::from_secs(1)).await? {
//!     println!("{} {:?}", record.offset, record.value());
//! }
//! # Ok(()) }
//! ```
//!
//! ## Errors and timeouts
//!
//! Every call returns [`Error`]; a broker's error reply is [`Error::Broker`] with its code,
//! never a successful value. [`Error::is_retriable`] says which errors a retry may cure.
//! Every call has a deadline — [`ClientConfig::connect_timeout`] (10 s),
//! [`ClientConfig::request_timeout`] (30 s, waiting for a free connection included) and, for
//! records, [`ProducerConfig::delivery_timeout`] (2 min, retries included) — so a dead broker
//! makes every pending call fail within its timeout instead of hanging; when the connection
//! closes, they fail at once.
//!
//! ## Connections
//!
//! A [`Client`] talks to each broker over a small pool of connections
//! ([`ClientConfig::pool_size`], default 2, opened on demand), each with up to
//! [`ClientConfig::max_in_flight`] requests pipelined (default 64). A connection is a task
//! that owns the core's driver; calls reach it through a channel. When every connection is
//! that busy, a call waits for room (within its timeout) rather than failing. Dialling happens
//! in its own task, never under a lock; a broken connection is replaced by the next call, with
//! exponential backoff and jitter between failed dials ([`ClientConfig::reconnect_backoff`]).
//! A read-only request whose connection closes under it is sent once more.
//!
//! ## Clusters
//!
//! Give the client several brokers — `Client::connect("h1:9092,h2:9092,h3:9092")` or
//! [`ClientBuilder::connect_bootstrap`] — and it uses the first that answers a Metadata
//! request ([`Error::Unreachable`] names each address and why when none does). Produce,
//! Fetch and GetOffset of a partition go to that partition's leader, over a pool per broker
//! opened when first needed; admin calls go to the broker it connected to. The Metadata is read
//! again after a `NotLeader` answer, after a lost connection to a leader, and every
//! [`ClientConfig::metadata_refresh`] (5 min); the failed fetch or offset read is retried
//! within its request timeout, a produce batch within its delivery timeout (with the same
//! sequence numbers: an idempotent batch still lands once). One address works as before: a
//! single broker is never routed, and against a cluster the routes are learnt at the first
//! `NotLeader` or partition count read. See [`Client`] for the details.
//!
//! ## Delivery semantics
//!
//! A [`Producer`] batch that fails with a retriable error is sent again (with backoff,
//! within the delivery timeout). With idempotence on (the default,
//! [`ProducerConfig::idempotence`], protocol §6.2) a retry of a batch the broker had already
//! appended is answered with the original offsets: each acknowledged record lands **once**,
//! as long as the broker keeps the producer's state; a batch that fails for good reports its
//! error even if an attempt landed (see [`Producer`]). With it off, delivery is
//! **at-least-once**: such a retry stores the records twice. Records of one
//! partition keep their order: up to [`ProducerConfig::max_in_flight`] batches of a partition
//! (5 by default) are in flight at once on one connection with idempotence on, retried one
//! at a time in order after a failure; one with it off. No failure is dropped:
//! each record's [`Delivery`] resolves to its offset or its error (a [`Deliveries`] gathers
//! many records' and resolves once for all of them), and [`Producer::close`] returns every
//! failure.
//!
//! The [`Consumer`] reads assigned partitions from an explicit position (no consumer groups
//! or committed offsets yet), in order, with long-poll fetches (protocol §6.1), through
//! [`Consumer::poll`], [`Consumer::recv`] or as a `futures` [`Stream`](futures_core::Stream)
//! of records. [`Consumer::lag`] and [`Consumer::caught_up`] say how far it is from each
//! partition's end, for "read what is there, then stop".
//!
//! [`Client::metadata`] describes the brokers and each partition's leader and replicas
//! (protocol §6.4); the producer learns partition counts from it, and every reply updates the
//! client's routes.
//!
//! ## Runtimes
//!
//! The async API runs on tokio (the client must be created inside a tokio runtime; its
//! tasks run there). [`blocking`] offers the same calls for plain threads, and the `smol`
//! feature the async calls for any executor; both run the client on a private tokio runtime.
//!
//! For the lowest latency of one-at-a-time calls, call from a task of the runtime (not from
//! `block_on`'s thread, to which every wake-up crosses threads) or use a current-thread
//! runtime. `examples/bench.rs` measures sync produce, batching produce and consume against
//! a running broker.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod blocking;
mod client;
mod conn;
mod consumer;
mod error;
mod partition;
mod producer;
mod route;
#[cfg(feature = "smol")]
#[cfg_attr(docsrs, doc(cfg(feature = "smol")))]
pub mod smol;
mod types;

/// The shared byte buffer of a [`Record`]'s key, value and headers (from the `bytes` crate).
pub use bytes::Bytes;
pub use client::{Client, ClientBuilder, ClientConfig, TlsOptions, Token, check_topic_name};
pub use consumer::{Consumer, ConsumerConfig, Offset, ResetPolicy};
pub use error::{Context, Error, ErrorCode, ProtocolError, Result};
pub use partition::{fnv1a32, partition_for_key};
pub use producer::{BufferFull, Delivered, Deliveries, Delivery, Producer, ProducerConfig};
/// The rustls this crate speaks TLS with (to match [`Error::Tls`]'s source, or build a
/// configuration for [`ClientBuilder::tls_config`]).
pub use streambus_adapters::tls::rustls;
pub use types::{
    BrokerMetadata, ConsumerRecord, Health, Metadata, PartitionMetadata, PartitionOffsets, Record,
    RecordMetadata, TopicInfo, TopicMetadata,
};
