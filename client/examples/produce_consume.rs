//! Async produce and consume (follow) against a broker.
//!
//! ```text
//! cargo run -p streambus-server -- --listen 127.0.0.1:9092 &
//! cargo run -p streambus-client --example produce_consume -- 127.0.0.1:9092
//! ```

use std::time::Duration;

use streambus_client::{Client, Consumer, Offset, Producer, Record};

#[tokio::main]
async fn main() -> Result<(), streambus_client::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let client = Client::connect(addr).await?;
    client.create_topic("example", 3).await?;

    // Batched: enqueue many, then await the deliveries.
    let producer = Producer::new(&client);
    let mut deliveries = Vec::new();
    for i in 0..30 {
        let record = Record::new("example", format!("message {i}")).key(format!("user-{}", i % 5));
        deliveries.push(producer.enqueue(record).await?);
    }
    for d in deliveries {
        let at = d.await?;
        println!("stored at partition {} offset {}", at.partition, at.offset);
    }
    if let Err(failures) = producer.close().await {
        eprintln!("{} records failed", failures.len());
    }

    // Follow every partition from the start until it has been quiet for a second.
    let mut consumer = Consumer::new(&client);
    for p in 0..3 {
        consumer.assign("example", p, Offset::Earliest).await?;
    }
    loop {
        let records = consumer.poll(Duration::from_secs(1)).await?;
        if records.is_empty() {
            break;
        }
        for r in records {
            println!(
                "{}/{}@{}: {}",
                r.topic,
                r.partition,
                r.offset,
                String::from_utf8_lossy(r.value())
            );
        }
    }
    for t in client.list_topics().await? {
        println!("topic {} ({} partitions)", t.name, t.partitions);
    }
    Ok(())
}
