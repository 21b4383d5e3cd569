//! Produce two messages and fetch them back with the blocking client.
//!
//! Start a broker (`cargo run --release -p streambus-server`), then:
//! `cargo run -p streambus-adapters --features blocking --example produce_fetch [ADDR]`

use streambus_core::{
    ClientConfig, Encode, FetchRequest, Message, MessageSetBuilder, ProduceRequest, Request,
    Response, Topic,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into())
        .parse()?;
    let mut client =
        streambus_adapters::blocking::connect::<8>(addr, ClientConfig::default(), 1 << 20)?;
    let topic = Topic::new("example")?;

    let messages = [Message::new(b"k1", b"hello"), Message::new(b"k2", b"world")];
    let mut buf = vec![0u8; messages.iter().map(Encode::encoded_len).sum()];
    let mut set = MessageSetBuilder::new(&mut buf);
    for m in &messages {
        set.push(m)?;
    }
    let produce = Request::Produce(ProduceRequest {
        topic,
        partition: 0,
        messages: set.finish(),
        producer: None,
    });
    match client.request(&produce)? {
        Response::Produce(p) => println!(
            "appended {} messages at offset {}",
            p.num_messages, p.base_offset
        ),
        other => println!("produce failed: {other:?}"),
    }

    let fetch = Request::Fetch(FetchRequest {
        topic,
        partition: 0,
        offset: 0,
        max_bytes: 64 * 1024,
        extension: None,
    });
    match client.request(&fetch)? {
        Response::Fetch(f) => {
            for m in f.messages.iter() {
                println!("{}: {}", m.offset, String::from_utf8_lossy(m.value));
            }
        }
        other => println!("fetch failed: {other:?}"),
    }
    Ok(())
}
