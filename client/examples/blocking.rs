//! The blocking API: produce and consume without async.
//!
//! ```text
//! cargo run -p streambus-client --example blocking -- 127.0.0.1:9092
//! ```

use std::time::Duration;

use streambus_client::blocking::{Client, Consumer, Producer};
use streambus_client::{Offset, Record};

fn main() -> Result<(), streambus_client::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let client = Client::connect(addr)?;
    let producer = Producer::new(&client);
    let first = producer.send(Record::new("blocking-example", "hello"))?;
    producer.send(Record::new("blocking-example", "world"))?;
    let mut consumer = Consumer::new(&client);
    consumer.assign(
        "blocking-example",
        first.partition,
        Offset::At(first.offset),
    )?;
    for r in consumer.poll(Duration::from_secs(1))? {
        println!("{}: {}", r.offset, String::from_utf8_lossy(r.value()));
    }
    println!("health: {:?}", client.health()?);
    Ok(())
}
