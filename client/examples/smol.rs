//! The client on smol's executor (feature `smol`).
//!
//! ```text
//! cargo run -p streambus-client --features smol --example smol -- 127.0.0.1:9092
//! ```

use std::time::Duration;

use streambus_client::smol::{Client, Consumer, Producer};
use streambus_client::{Offset, Record};

fn main() -> Result<(), streambus_client::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    smol::block_on(async {
        let client = Client::connect(addr).await?;
        let producer = Producer::new(&client);
        let mut deliveries = Vec::new();
        for i in 0..10 {
            deliveries.push(
                producer
                    .enqueue(Record::new("smol-example", format!("m{i}")))
                    .await?,
            );
        }
        let mut first = None;
        for d in deliveries {
            let at = d.await?;
            first.get_or_insert(at);
        }
        let Some(first) = first else { return Ok(()) };
        let mut consumer = Consumer::new(&client);
        consumer
            .assign("smol-example", first.partition, Offset::At(first.offset))
            .await?;
        for r in consumer.poll(Duration::from_secs(1)).await? {
            println!("{}: {}", r.offset, String::from_utf8_lossy(r.value()));
        }
        Ok(())
    })
}
