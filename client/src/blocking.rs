//! The same API for plain threads: every call blocks. It runs the async client on a private
//! tokio runtime (two worker threads) owned by the [`Client`]; don't call it from inside an
//! async runtime (use the async API there).
//!
//! ```no_run
//! use streambus_client::blocking::{Client, Consumer, Producer};
//! use streambus_client::{Offset, Record};
//!
//! # fn demo() -> Result<(), streambus_client::Error> {
//! let client = Client::connect("127.0.0.1:9092")?;
//! let producer = Producer::new(&client);
//! let at = producer.send(Record::new("orders", "hello"))?;
//! let mut consumer = Consumer::new(&client);
//! consumer.assign("orders", at.partition, Offset::At(at.offset))?;
//! let records = consumer.poll(std::time::Duration::from_secs(1))?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::types::{
    ConsumerRecord, Health, Metadata, PartitionOffsets, Record, RecordMetadata, TopicInfo,
};
use crate::{ClientBuilder, ConsumerConfig, Delivery, Offset, ProducerConfig};

/// The private runtime of a blocking (or `smol`) client. Dropping it never blocks or
/// panics, wherever the last handle goes (even inside another async runtime).
#[derive(Debug)]
pub(crate) struct Runtime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        // Some until dropped.
        match &self.0 {
            Some(rt) => rt,
            None => unreachable_runtime(),
        }
    }
}

#[allow(clippy::panic)]
fn unreachable_runtime() -> ! {
    panic!("the client's runtime is used after being dropped")
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) fn runtime() -> Result<Arc<Runtime>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("streambus-client")
        .enable_all()
        .build()
        .map(|rt| Arc::new(Runtime(Some(rt))))
        .map_err(|e| Error::config("runtime", format!("can't start the client's runtime: {e}")))
}

/// Runs `fut` to completion on the client's runtime, refusing (instead of panicking) when
/// called from inside an async runtime.
fn run<T>(rt: &Runtime, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::config(
            "blocking",
            "a blocking call inside an async runtime would stall it: use the async API there",
        ));
    }
    rt.block_on(fut)
}

/// A blocking [`crate::Client`].
#[derive(Debug, Clone)]
pub struct Client {
    rt: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Connects with the default settings.
    pub fn connect(addr: impl Into<String>) -> Result<Self> {
        Self::connect_with(crate::Client::builder(), addr)
    }

    /// Connects with the builder's settings.
    pub fn connect_with(builder: ClientBuilder, addr: impl Into<String>) -> Result<Self> {
        let rt = runtime()?;
        let addr = addr.into();
        let inner = run(&rt, builder.connect(addr))?;
        Ok(Self { rt, inner })
    }

    /// The async client underneath (its calls need the runtime: use them from async code).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// See [`crate::Client::create_topic`].
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool> {
        run(&self.rt, self.inner.create_topic(topic, partitions))
    }
    /// See [`crate::Client::create_topic_replicated`].
    pub fn create_topic_replicated(
        &self,
        topic: &str,
        partitions: u32,
        replication_factor: u16,
    ) -> Result<bool> {
        run(
            &self.rt,
            self.inner
                .create_topic_replicated(topic, partitions, replication_factor),
        )
    }
    /// See [`crate::Client::delete_topic`].
    pub fn delete_topic(&self, topic: &str) -> Result<()> {
        run(&self.rt, self.inner.delete_topic(topic))
    }
    /// See [`crate::Client::list_topics`].
    pub fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        run(&self.rt, self.inner.list_topics())
    }
    /// See [`crate::Client::metadata`].
    pub fn metadata<I, S>(&self, topics: I) -> Result<Metadata>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        run(&self.rt, self.inner.metadata(topics))
    }
    /// See [`crate::Client::offsets`].
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        run(&self.rt, self.inner.offsets(topic, partition))
    }
    /// See [`crate::Client::describe_topic`].
    pub fn describe_topic(&self, topic: &str) -> Result<Vec<PartitionOffsets>> {
        run(&self.rt, self.inner.describe_topic(topic))
    }
    /// See [`crate::Client::health`].
    pub fn health(&self) -> Result<Health> {
        run(&self.rt, self.inner.health())
    }
}

/// A blocking [`crate::Producer`]. [`enqueue`](Self::enqueue) returns a [`Delivery`] whose
/// [`wait`](Delivery::wait) blocks for the outcome.
#[derive(Debug, Clone)]
pub struct Producer {
    rt: Arc<Runtime>,
    inner: crate::Producer,
}

impl Producer {
    /// A producer with the default settings.
    pub fn new(client: &Client) -> Self {
        let _guard = client.rt.enter();
        Self {
            rt: client.rt.clone(),
            inner: crate::Producer::new(&client.inner),
        }
    }

    /// A producer with `config`.
    pub fn with_config(client: &Client, config: ProducerConfig) -> Result<Self> {
        let _guard = client.rt.enter();
        Ok(Self {
            rt: client.rt.clone(),
            inner: crate::Producer::with_config(&client.inner, config)?,
        })
    }

    /// Sends one record and waits for its acknowledgement.
    pub fn send(&self, record: Record) -> Result<RecordMetadata> {
        run(&self.rt, self.inner.send(record))
    }

    /// Buffers one record (blocking only while the buffer is full); wait for the outcome with
    /// [`Delivery::wait`].
    pub fn enqueue(&self, record: Record) -> Result<Delivery> {
        run(&self.rt, self.inner.enqueue(record))
    }

    /// Buffers many records, taking the producer's lock once for as many as it can; see
    /// [`crate::Producer::enqueue_many`] (the same partial-take rule on error).
    /// Into a [`Deliveries`](crate::Deliveries), wait for them all with
    /// [`Deliveries::wait`](crate::Deliveries::wait).
    pub fn enqueue_many<I, D>(&self, records: I, deliveries: &mut D) -> Result<()>
    where
        I: IntoIterator<Item = Record>,
        D: Extend<Delivery> + 'static,
    {
        run(&self.rt, self.inner.enqueue_many(records, deliveries))
    }

    /// See [`crate::Producer::flush`].
    pub fn flush(&self) -> Result<()> {
        run(&self.rt, async {
            self.inner.flush().await;
            Ok(())
        })
    }

    /// See [`crate::Producer::close`].
    pub fn close(&self) -> std::result::Result<(), Vec<Error>> {
        match run(&self.rt, async { Ok(self.inner.close().await) }) {
            Ok(r) => r,
            Err(e) => Err(vec![e]),
        }
    }
}

/// A blocking [`crate::Consumer`].
#[derive(Debug)]
pub struct Consumer {
    rt: Arc<Runtime>,
    inner: crate::Consumer,
}

impl Consumer {
    /// A consumer with the default settings.
    pub fn new(client: &Client) -> Self {
        Self {
            rt: client.rt.clone(),
            inner: crate::Consumer::new(&client.inner),
        }
    }

    /// A consumer with `config`.
    pub fn with_config(client: &Client, config: ConsumerConfig) -> Result<Self> {
        Ok(Self {
            rt: client.rt.clone(),
            inner: crate::Consumer::with_config(&client.inner, config)?,
        })
    }

    /// See [`crate::Consumer::assign`].
    pub fn assign(&mut self, topic: &str, partition: u32, from: Offset) -> Result<()> {
        run(&self.rt, self.inner.assign(topic, partition, from))
    }
    /// See [`crate::Consumer::seek`].
    pub fn seek(&mut self, topic: &str, partition: u32, to: Offset) -> Result<()> {
        run(&self.rt, self.inner.seek(topic, partition, to))
    }
    /// See [`crate::Consumer::position`].
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.inner.position(topic, partition)
    }
    /// See [`crate::Consumer::lag`].
    pub fn lag(&self, topic: &str, partition: u32) -> Option<i64> {
        self.inner.lag(topic, partition)
    }
    /// See [`crate::Consumer::caught_up`].
    pub fn caught_up(&self) -> bool {
        self.inner.caught_up()
    }
    /// See [`crate::Consumer::poll`].
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        run(&self.rt, self.inner.poll(timeout))
    }
    /// See [`crate::Consumer::recv`].
    pub fn recv(&mut self) -> Result<ConsumerRecord> {
        run(&self.rt, self.inner.recv())
    }
}
