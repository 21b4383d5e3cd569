//! Admin calls: health, create, list, describe (offsets per partition), delete.
//!
//! ```text
//! cargo run -p streambus-client --example admin -- 127.0.0.1:9092
//! ```

use streambus_client::{Client, ErrorCode};

#[tokio::main]
async fn main() -> Result<(), streambus_client::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let client = Client::connect(addr).await?;
    let health = client.health().await?;
    println!("broker {} (up {} s)", health.status, health.uptime_secs);

    let created = client.create_topic("admin-example", 4).await?;
    println!(
        "admin-example: {}",
        if created { "created" } else { "already there" }
    );
    for t in client.list_topics().await? {
        println!("topic {} with {} partitions", t.name, t.partitions);
    }
    for p in client.describe_topic("admin-example").await? {
        println!(
            "partition {}: offsets {}..{} (high-water mark {})",
            p.partition, p.start, p.end, p.high_water_mark
        );
    }
    client.delete_topic("admin-example").await?;
    // A broker error is an `Err` with its code.
    match client.delete_topic("admin-example").await {
        Err(e) if e.code() == Some(ErrorCode::TOPIC_NOT_FOUND) => println!("deleted ({e})"),
        other => println!("unexpected: {other:?}"),
    }
    Ok(())
}
