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
//! never a successful value. Every call has a deadline (connect, request, delivery), so a
//! dead broker makes pending calls fail within their timeout instead of hanging.
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
#[cfg(feature = "smol")]
#[cfg_attr(docsrs, doc(cfg(feature = "smol")))]
pub mod smol;
mod types;

pub use client::{Client, ClientBuilder, ClientConfig};
pub use consumer::{Consumer, ConsumerConfig, Offset, ResetPolicy};
pub use error::{Context, Error, ErrorCode, ProtocolError, Result};
pub use partition::{fnv1a32, partition_for_key};
pub use producer::{BufferFull, Delivery, Producer, ProducerConfig};
pub use types::{ConsumerRecord, Health, PartitionOffsets, Record, RecordMetadata, TopicInfo};
