//! StreamBus on a Cortex-M4: the MPS2 AN386 board as QEMU emulates it, its UART0 connected to
//! a broker's TCP port (`-serial tcp:127.0.0.1:PORT`), so the UART's byte stream is the
//! StreamBus connection.
//!
//! The program authenticates with [`TOKEN`] (the test gives the broker an `--auth-file` with its
//! SHA-256), creates topic `mcu`, then with the blocking client produces records of several
//! sizes (up to 4000 bytes), one per request, fetches each back from the offset its produce
//! returned and compares it, and reads the partition's offsets; produces and fetches a 1 KiB
//! record through a client whose buffers are the smallest that carry it; sends a batch of
//! [`BATCH`] records with idempotent produce, then the same batch again with the same sequence
//! state (a retry), which must get the same offsets and append nothing; then does the same
//! as the first round with the async client. It reports through semihosting and exits with
//! status 0 (all done) or 1 (the first failure, printed as `error: ...`).
//!
//! Record `k` of round `r` has key `[r, b'0' + k]` and a value of `SIZES[k]` bytes,
//! byte `i` = `(7 i + 31 k + 101 r) mod 251` (`tests/tests/qemu.rs` checks them the same way);
//! the idempotent batch is round `i` with value sizes [`BATCH`].
#![no_std]
#![no_main]

mod board;

use core::fmt::Display;
use core::time::Duration;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use streambus_core::embedded::{Sequence, asynch, blocking};
use streambus_core::{
    ClientConfig, FetchResponse, FetchTrailer, Instant, Message, MessageSet, MessageSetBuilder,
    ProduceRequest, Request, Response, Topic, request_encoded_len, response_encoded_len,
};

use board::{SysTickTimer, Uart};

/// The topic the device writes (partition 0).
const TOPIC: &str = "mcu";
/// The value sizes of one round's records.
const SIZES: [usize; 5] = [1, 100, 1000, 2048, 4000];
/// The round of the 1 KiB record sent with the smallest buffers.
const SMALL_ROUND: u8 = b'm';
/// The token the device authenticates with (`tests/tests/qemu.rs` writes its SHA-256 into the
/// broker's `--auth-file`).
const TOKEN: &[u8] = b"mps2-an386-device-token";
/// The round of the idempotent batch, and its records' value sizes (one batch).
const BATCH_ROUND: u8 = b'i';
const BATCH: [usize; 3] = [10, 300, 1500];
/// The idempotent producer: id and epoch (a device serial and a boot counter, say).
const PRODUCER_ID: i64 = 386;
const EPOCH: i16 = 0;
/// A request's deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a blocking UART read waits for a first byte (then the client checks deadlines).
const QUIET_MS: u32 = 20;
/// Transmit and receive buffers: the largest Produce (a 4000-byte value) and Fetch reply.
const BUF: usize = 4608;

type Clock = fn() -> Instant;
type BlockingClient<'a> = blocking::Client<&'a mut Uart, Clock, &'a mut [u8]>;
type AsyncClient<'a> = asynch::Client<&'a mut Uart, SysTickTimer, &'a mut [u8]>;

/// Byte `i` of record `k`'s value in round `round`.
fn value_byte(round: u8, k: usize, i: usize) -> u8 {
    ((7 * i + 31 * k + 101 * usize::from(round)) % 251) as u8
}

fn key(round: u8, k: usize) -> [u8; 2] {
    [round, b'0' + k as u8]
}

/// Writes record `k` of `round` (`len` value bytes) as a one-message set.
fn record(round: u8, k: usize, len: usize, scratch: &mut Scratch) -> MessageSet<'_> {
    let value = &mut scratch.value[..len];
    for (i, b) in value.iter_mut().enumerate() {
        *b = value_byte(round, k, i);
    }
    let key = key(round, k);
    let mut builder = MessageSetBuilder::new(&mut scratch.set);
    check("build record", builder.push(&Message::new(&key, value)));
    builder.finish()
}

/// Whether `m` is record `k` of `round` with `len` value bytes, at `offset`.
fn matches(m: &Message<'_>, round: u8, k: usize, len: usize, offset: i64) -> bool {
    m.offset == offset
        && m.key == key(round, k)
        && m.value.len() == len
        && m.value
            .iter()
            .enumerate()
            .all(|(i, &b)| b == value_byte(round, k, i))
}

/// Reports `what` failed and exits with status 1.
fn fail(what: &str, why: impl Display) -> ! {
    hprintln!("error: {}: {}", what, why);
    exit(debug::EXIT_FAILURE)
}

/// Ends the emulation with `status` (QEMU exits 0 on success, 1 on failure).
fn exit(status: debug::ExitStatus) -> ! {
    debug::exit(status);
    loop {
        cortex_m::asm::wfi();
    }
}

fn check<T, E: Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(what, e))
}

fn expect(what: &str, ok: bool) {
    if !ok {
        fail(what, "unexpected reply");
    }
}

#[entry]
fn main() -> ! {
    let Some(peripherals) = cortex_m::Peripherals::take() else {
        fail("start", "peripherals taken")
    };
    board::start_clock(peripherals.SYST);
    let mut uart = Uart::new(Uart::UART0, QUIET_MS);
    let mut config = ClientConfig::default();
    config.request_timeout(REQUEST_TIMEOUT);
    let topic = check("topic", Topic::new(TOPIC));
    let (mut tx, mut rx) = ([0u8; BUF], [0u8; BUF]);
    let mut scratch = Scratch {
        value: [0; BUF],
        set: [0; BUF],
    };
    hprintln!(
        "streambus on mps2-an386: client state {} B (blocking), {} B (async), buffers {} + {} B",
        size_of::<BlockingClient<'_>>(),
        size_of::<AsyncClient<'_>>(),
        BUF,
        BUF
    );

    let clock: Clock = board::now;
    let mut client = BlockingClient::new(&mut uart, clock, config, &mut tx[..], &mut rx[..]);
    let auth = check("authenticate", client.authenticate(TOKEN));
    hprintln!("authenticate: principal {}", auth.principal);
    let created = check("create_topic", client.create_topic(topic, 1));
    hprintln!("create_topic {}: created {}", TOPIC, created.created);
    blocking_round(&mut client, topic, &mut scratch);

    // A 1 KiB record through the smallest buffers that carry it: the Produce, and the Fetch
    // reply with its trailer.
    let records = record(SMALL_ROUND, 0, 1024, &mut scratch);
    let tx_len = request_encoded_len(&Request::Produce(ProduceRequest {
        topic,
        partition: 0,
        messages: records,
        producer: None,
    }));
    let rx_len = response_encoded_len(&Response::Fetch(FetchResponse {
        high_water_mark: 0,
        messages: records,
        trailer: Some(FetchTrailer::default()),
    }));
    let (tx_small, rx_small) = (&mut tx[..tx_len], &mut rx[..rx_len]);
    let mut client = BlockingClient::new(&mut uart, clock, config, tx_small, rx_small);
    let ack = check("produce 1 KiB", client.produce(topic, 0, records));
    let record_len = records.as_bytes().len() as u32;
    let f = check(
        "fetch 1 KiB",
        client.fetch(topic, 0, ack.base_offset, record_len),
    );
    let first = f.messages.iter().next();
    let same = first.is_some_and(|m| matches(&m, SMALL_ROUND, 0, 1024, ack.base_offset));
    expect("fetch 1 KiB", same);
    hprintln!(
        "1 KiB record with tx {} B, rx {} B: produced at {}, fetched back, equal",
        tx_len,
        rx_len,
        ack.base_offset
    );

    let mut client = BlockingClient::new(&mut uart, clock, config, &mut tx[..], &mut rx[..]);
    idempotent_batch(&mut client, topic, &mut scratch);

    // The async client, on the same connection.
    let mut client = AsyncClient::new(&mut uart, SysTickTimer, config, &mut tx[..], &mut rx[..]);
    board::block_on(async_round(&mut client, topic, &mut scratch));
    hprintln!("ok in {} ms", board::millis());
    exit(debug::EXIT_SUCCESS)
}

/// Where a record is built: its value, then its one-message set.
struct Scratch {
    value: [u8; BUF],
    set: [u8; BUF],
}

/// Writes the records of `round` with value sizes `sizes` as one message set.
fn batch<'s>(round: u8, sizes: &[usize], scratch: &'s mut Scratch) -> MessageSet<'s> {
    let mut builder = MessageSetBuilder::new(&mut scratch.set);
    for (k, &len) in sizes.iter().enumerate() {
        let value = &mut scratch.value[..len];
        for (i, b) in value.iter_mut().enumerate() {
            *b = value_byte(round, k, i);
        }
        let key = key(round, k);
        check("build batch", builder.push(&Message::new(&key, value)));
    }
    builder.finish()
}

/// Sends round `i` as one batch with idempotent produce, then again with the sequence state
/// of the first send (a retry whose reply was lost): the retry gets the same offsets, and
/// the partition's end offset shows the batch appended once.
fn idempotent_batch(client: &mut BlockingClient<'_>, topic: Topic<'_>, scratch: &mut Scratch) {
    let records = batch(BATCH_ROUND, &BATCH, scratch);
    let mut seq = Sequence::new(PRODUCER_ID, EPOCH);
    let before = seq;
    let ack = check(
        "produce_idempotent",
        client.produce_idempotent(&mut seq, topic, 0, records),
    );
    expect("produce_idempotent", ack.num_messages == BATCH.len() as u32);
    hprintln!(
        "idempotent: batch of {} at offset {}, sequence {} -> {}",
        ack.num_messages,
        ack.base_offset,
        before.next,
        seq.next
    );
    let mut retry = before;
    let again = check(
        "produce_idempotent retry",
        client.produce_idempotent(&mut retry, topic, 0, records),
    );
    expect(
        "produce_idempotent retry",
        again.base_offset == ack.base_offset && again.num_messages == ack.num_messages,
    );
    expect("produce_idempotent retry", retry == seq);
    let o = check("get_offset", client.get_offset(topic, 0));
    expect(
        "idempotent get_offset",
        o.end_offset == ack.base_offset + i64::from(ack.num_messages),
    );
    hprintln!(
        "idempotent: retry got offset {}, {}/0 end {}: appended once",
        again.base_offset,
        TOPIC,
        o.end_offset
    );
}

/// Produces round `b` (one record per request), fetches each record back from the offset its
/// produce returned, compares, and checks the partition's end offset.
fn blocking_round(client: &mut BlockingClient<'_>, topic: Topic<'_>, scratch: &mut Scratch) {
    let mut offsets = [0i64; SIZES.len()];
    for (k, &len) in SIZES.iter().enumerate() {
        let records = record(b'b', k, len, scratch);
        let ack = check("produce", client.produce(topic, 0, records));
        expect("produce", ack.num_messages == 1);
        offsets[k] = ack.base_offset;
    }
    hprintln!("blocking: produced {:?} B at offsets {:?}", SIZES, offsets);
    for (k, &len) in SIZES.iter().enumerate() {
        let f = check("fetch", client.fetch(topic, 0, offsets[k], len as u32));
        let first = f.messages.iter().next();
        let same = first.is_some_and(|m| matches(&m, b'b', k, len, offsets[k]));
        expect("fetch", same);
    }
    hprintln!("blocking: fetched {} records back, equal", SIZES.len());
    let o = check("get_offset", client.get_offset(topic, 0));
    expect("get_offset", o.end_offset == offsets[SIZES.len() - 1] + 1);
    hprintln!(
        "blocking: {}/0 offsets start {} end {}",
        TOPIC,
        o.start_offset,
        o.end_offset
    );
}

/// [`blocking_round`] with the async client, round `a`.
async fn async_round(client: &mut AsyncClient<'_>, topic: Topic<'_>, scratch: &mut Scratch) {
    let mut offsets = [0i64; SIZES.len()];
    for (k, &len) in SIZES.iter().enumerate() {
        let records = record(b'a', k, len, scratch);
        let ack = check("async produce", client.produce(topic, 0, records).await);
        expect("async produce", ack.num_messages == 1);
        offsets[k] = ack.base_offset;
    }
    hprintln!("async: produced {:?} B at offsets {:?}", SIZES, offsets);
    for (k, &len) in SIZES.iter().enumerate() {
        let f = client.fetch(topic, 0, offsets[k], len as u32).await;
        let f = check("async fetch", f);
        let first = f.messages.iter().next();
        let same = first.is_some_and(|m| matches(&m, b'a', k, len, offsets[k]));
        expect("async fetch", same);
    }
    hprintln!("async: fetched {} records back, equal", SIZES.len());
    let o = check("async get_offset", client.get_offset(topic, 0).await);
    expect(
        "async get_offset",
        o.end_offset == offsets[SIZES.len() - 1] + 1,
    );
    hprintln!(
        "async: {}/0 offsets start {} end {}",
        TOPIC,
        o.start_offset,
        o.end_offset
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    hprintln!("error: panic: {}", info);
    exit(debug::EXIT_FAILURE)
}
