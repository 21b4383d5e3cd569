//! The async API for any executor — smol, async-std, futures' — without a tokio runtime of
//! your own (feature `smol`).
//!
//! The client's connection tasks and timers run on a private two-thread tokio runtime owned
//! by the [`Client`]; each call is spawned there and awaited through its join handle, which
//! any executor can poll, and dropping a call's future cancels the call there, as on tokio.
//! [`Delivery`] is executor-independent already. A call costs one extra task hop compared
//! with [`crate::Client`] on tokio.
//!
//! ```no_run
//! use streambus_client::smol::{Client, Producer};
//! use streambus_client::Record;
//!
//! # fn demo() -> Result<(), streambus_client::Error> {
//! smol::block_on(async {
//!     let client = Client::connect("127.0.0.1:9092").await?;
//!     let producer = Producer::new(&client);
//!     let at = producer.send(Record::new("orders", "hello")).await?;
//!     println!("stored at {}/{}", at.partition, at.offset);
//!     Ok(())
//! })
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::types::{
    ConsumerRecord, Health, Metadata, PartitionOffsets, Record, RecordMetadata, TopicInfo,
};
use crate::{ClientBuilder, ConsumerConfig, Delivery, Offset, ProducerConfig};

/// Runs `fut` on the client's runtime and awaits it from the caller's executor. Dropping the
/// returned future cancels `fut` there, as dropping a call's future does on tokio: a call given
/// up on (a timeout raced against it) does not go on unobserved, holding what it holds (a
/// consumer's lock) and taking what it was waiting for (the next record).
async fn on<T: Send + 'static>(
    rt: &crate::blocking::Runtime,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let mut task = AbortOnDrop(rt.spawn(fut));
    (&mut task.0).await.unwrap_or_else(|e| {
        Err(Error::Closed {
            context: Context::new(if e.is_panic() {
                "panicked call"
            } else {
                "call"
            }),
            what: "client runtime",
        })
    })
}

/// A task of the client's runtime, cancelled when its caller drops it (a tokio `JoinHandle`
/// dropped lets its task run on).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        // A no-op once the task has finished.
        self.0.abort();
    }
}

/// An async [`crate::Client`] for any executor.
#[derive(Debug, Clone)]
pub struct Client {
    rt: Arc<crate::blocking::Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Connects with the default settings.
    pub async fn connect(addr: impl Into<String>) -> Result<Self> {
        Self::connect_with(crate::Client::builder(), addr).await
    }

    /// Connects with the builder's settings.
    pub async fn connect_with(builder: ClientBuilder, addr: impl Into<String>) -> Result<Self> {
        let rt = crate::blocking::runtime()?;
        let addr = addr.into();
        let inner = on(&rt, builder.connect(addr)).await?;
        Ok(Self { rt, inner })
    }

    /// See [`crate::Client::create_topic`].
    pub async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool> {
        self.create_topic_replicated(topic, partitions, 0).await
    }
    /// See [`crate::Client::create_topic_replicated`].
    pub async fn create_topic_replicated(
        &self,
        topic: &str,
        partitions: u32,
        replication_factor: u16,
    ) -> Result<bool> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move {
            c.create_topic_replicated(&t, partitions, replication_factor)
                .await
        })
        .await
    }
    /// See [`crate::Client::delete_topic`].
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move { c.delete_topic(&t).await }).await
    }
    /// See [`crate::Client::list_topics`].
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let c = self.inner.clone();
        on(&self.rt, async move { c.list_topics().await }).await
    }
    /// See [`crate::Client::metadata`].
    pub async fn metadata<I, S>(&self, topics: I) -> Result<Metadata>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let (c, topics) = (
            self.inner.clone(),
            topics
                .into_iter()
                .map(|t| t.as_ref().to_owned())
                .collect::<Vec<_>>(),
        );
        on(&self.rt, async move { c.metadata(topics).await }).await
    }
    /// See [`crate::Client::offsets`].
    pub async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move { c.offsets(&t, partition).await }).await
    }
    /// See [`crate::Client::describe_topic`].
    pub async fn describe_topic(&self, topic: &str) -> Result<Vec<PartitionOffsets>> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move { c.describe_topic(&t).await }).await
    }
    /// See [`crate::Client::health`].
    pub async fn health(&self) -> Result<Health> {
        let c = self.inner.clone();
        on(&self.rt, async move { c.health().await }).await
    }
}

/// An async [`crate::Producer`] for any executor.
#[derive(Debug, Clone)]
pub struct Producer {
    rt: Arc<crate::blocking::Runtime>,
    inner: crate::Producer,
}

impl Producer {
    /// A producer with the default settings.
    pub fn new(client: &Client) -> Self {
        Self {
            rt: client.rt.clone(),
            inner: crate::Producer::new(&client.inner),
        }
    }

    /// A producer with `config`.
    pub fn with_config(client: &Client, config: ProducerConfig) -> Result<Self> {
        Ok(Self {
            rt: client.rt.clone(),
            inner: crate::Producer::with_config(&client.inner, config)?,
        })
    }

    /// See [`crate::Producer::send`].
    pub async fn send(&self, record: Record) -> Result<RecordMetadata> {
        let p = self.inner.clone();
        on(&self.rt, async move { p.send(record).await }).await
    }

    /// See [`crate::Producer::enqueue`]; the [`Delivery`] can be awaited on any executor.
    pub async fn enqueue(&self, record: Record) -> Result<Delivery> {
        let p = self.inner.clone();
        on(&self.rt, async move { p.enqueue(record).await }).await
    }

    /// See [`crate::Producer::enqueue_many`] (the same partial-take rule on error); the
    /// [`Delivery`]s (or a [`Deliveries`](crate::Deliveries)) can be awaited on any executor.
    pub async fn enqueue_many<I, D>(&self, records: I, deliveries: &mut D) -> Result<()>
    where
        I: IntoIterator<Item = Record>,
        D: Extend<Delivery> + 'static,
    {
        let p = self.inner.clone();
        let records: Vec<Record> = records.into_iter().collect();
        let (taken, result) = on(&self.rt, async move {
            let mut taken = Vec::new();
            let result = p.enqueue_many(records, &mut taken).await;
            Ok((taken, result))
        })
        .await?;
        deliveries.extend(taken);
        result
    }

    /// See [`crate::Producer::flush`].
    pub async fn flush(&self) {
        let p = self.inner.clone();
        let _ = on(&self.rt, async move {
            p.flush().await;
            Ok(())
        })
        .await;
    }

    /// See [`crate::Producer::close`].
    pub async fn close(&self) -> std::result::Result<(), Vec<Error>> {
        let p = self.inner.clone();
        // Cancelled with its future as the other calls are: the failures are taken only once
        // the flush is over, so a close given up on leaves them for the next.
        match on(&self.rt, async move { Ok(p.close().await) }).await {
            Ok(r) => r,
            Err(e) => Err(vec![e]),
        }
    }
}

/// An async [`crate::Consumer`] for any executor. Cancelling a `poll` or `recv` (dropping its
/// future) cancels it on the client's runtime too, as on tokio: records it had already taken
/// may be dropped (the position has moved past them); the consumer is free for the next call.
#[derive(Debug)]
pub struct Consumer {
    rt: Arc<crate::blocking::Runtime>,
    inner: Arc<tokio::sync::Mutex<crate::Consumer>>,
}

impl Consumer {
    /// A consumer with the default settings.
    pub fn new(client: &Client) -> Self {
        Self {
            rt: client.rt.clone(),
            inner: Arc::new(tokio::sync::Mutex::new(crate::Consumer::new(&client.inner))),
        }
    }

    /// A consumer with `config`.
    pub fn with_config(client: &Client, config: ConsumerConfig) -> Result<Self> {
        Ok(Self {
            rt: client.rt.clone(),
            inner: Arc::new(tokio::sync::Mutex::new(crate::Consumer::with_config(
                &client.inner,
                config,
            )?)),
        })
    }

    /// See [`crate::Consumer::assign`].
    pub async fn assign(&mut self, topic: &str, partition: u32, from: Offset) -> Result<()> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move {
            c.lock().await.assign(&t, partition, from).await
        })
        .await
    }
    /// See [`crate::Consumer::seek`].
    pub async fn seek(&mut self, topic: &str, partition: u32, to: Offset) -> Result<()> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move {
            c.lock().await.seek(&t, partition, to).await
        })
        .await
    }
    /// See [`crate::Consumer::position`].
    pub async fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(&self.rt, async move {
            Ok(c.lock().await.position(&t, partition))
        })
        .await
        .ok()
        .flatten()
    }
    /// See [`crate::Consumer::lag`].
    pub async fn lag(&self, topic: &str, partition: u32) -> Option<i64> {
        let (c, t) = (self.inner.clone(), topic.to_owned());
        on(
            &self.rt,
            async move { Ok(c.lock().await.lag(&t, partition)) },
        )
        .await
        .ok()
        .flatten()
    }
    /// See [`crate::Consumer::caught_up`].
    pub async fn caught_up(&self) -> bool {
        let c = self.inner.clone();
        on(&self.rt, async move { Ok(c.lock().await.caught_up()) })
            .await
            .unwrap_or(false)
    }
    /// See [`crate::Consumer::poll`].
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let c = self.inner.clone();
        on(&self.rt, async move { c.lock().await.poll(timeout).await }).await
    }
    /// See [`crate::Consumer::recv`].
    pub async fn recv(&mut self) -> Result<ConsumerRecord> {
        let c = self.inner.clone();
        on(&self.rt, async move { c.lock().await.recv().await }).await
    }
}
