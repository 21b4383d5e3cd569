//! Example firmware: produce one message and fetch it back through streambus-core's embedded
//! client, over a transport that plays a canned broker. Nothing here touches hardware, so it
//! links for `thumbv7em-none-eabihf` without a board crate; `scripts/footprint.sh` measures it.
//!
//! With the `baseline` feature the same image is built without the client (the transport
//! still moves the same bytes), so the difference between the two is the client's share.
//! `only-produce` and `only-fetch` build the client with one of the two calls;
//! `auth-idempotent` adds `authenticate` (first) and an idempotent produce (after the produce).
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]

use core::sync::atomic::{AtomicU32, Ordering};

/// A millisecond tick counter, as a SysTick handler would advance it.
static TICKS: AtomicU32 = AtomicU32::new(0);

/// The outcome, for a debugger to read: 1 = produce and fetch round-tripped, 2+ = a failure.
#[cfg_attr(test, allow(dead_code))]
static RESULT: AtomicU32 = AtomicU32::new(0);

/// The broker's replies to request 1 (Produce: base offset 0, 1 message, high-water mark 1)
/// and request 2 (Fetch: the message "temp" = "21.5" at offset 0), encoded by
/// `streambus_core::encode_response`.
#[cfg_attr(
    any(feature = "only-fetch", feature = "auth-idempotent"),
    allow(dead_code)
)]
const PRODUCE_REPLY: [u8; 39] = [
    0, 0, 0, 35, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 1, 136, 80, 237, 66,
];
#[cfg_attr(
    any(feature = "only-fetch", feature = "auth-idempotent"),
    allow(dead_code)
)]
const FETCH_REPLY: [u8; 83] = [
    0, 0, 0, 79, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 0, 23, 151, 156, 254, 54, 42, 0, 0, 0, 0, 0, 4, 116, 101, 109, 112, 0, 0, 0, 4, 50,
    49, 46, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 202, 18, 110, 144,
];
/// The same Fetch reply answering request 1 (the `only-fetch` image's first request).
#[cfg_attr(not(feature = "only-fetch"), allow(dead_code))]
const FETCH_REPLY_FIRST: [u8; 83] = [
    0, 0, 0, 79, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 0, 23, 151, 156, 254, 54, 42, 0, 0, 0, 0, 0, 4, 116, 101, 109, 112, 0, 0, 0, 4, 50,
    49, 46, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 101, 84, 198, 246,
];

/// For `auth-idempotent`: request 1 (Authenticate: principal "dev"), request 2 (Produce as
/// [`PRODUCE_REPLY`]), request 3 (the idempotent Produce: base offset 1, 1 message,
/// high-water mark 2), request 4 (Fetch as [`FETCH_REPLY`]).
#[cfg_attr(not(feature = "auth-idempotent"), allow(dead_code))]
const AUTH_REPLY_FIRST: [u8; 26] = [
    0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 100, 101, 118, 90, 18, 151, 116,
];
#[cfg_attr(not(feature = "auth-idempotent"), allow(dead_code))]
const PRODUCE_REPLY_SECOND: [u8; 39] = [
    0, 0, 0, 35, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 1, 208, 78, 68, 106,
];
#[cfg_attr(not(feature = "auth-idempotent"), allow(dead_code))]
const PRODUCE_REPLY_THIRD: [u8; 39] = [
    0, 0, 0, 35, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 2, 21, 244, 169, 114,
];
#[cfg_attr(not(feature = "auth-idempotent"), allow(dead_code))]
const FETCH_REPLY_FOURTH: [u8; 83] = [
    0, 0, 0, 79, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 0, 23, 151, 156, 254, 54, 42, 0, 0, 0, 0, 0, 4, 116, 101, 109, 112, 0, 0, 0, 4, 50,
    49, 46, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 79, 238, 56, 29,
];

/// How many replies the canned broker holds (2 unless `auth-idempotent`: an array of 2 keeps
/// the other images, baseline included, as they were measured before).
const NUM_REPLIES: usize = if cfg!(feature = "auth-idempotent") {
    4
} else {
    2
};

/// The replies, in request order.
#[cfg(not(any(feature = "only-fetch", feature = "auth-idempotent")))]
const REPLIES: [&[u8]; NUM_REPLIES] = [&PRODUCE_REPLY, &FETCH_REPLY];
#[cfg(feature = "only-fetch")]
const REPLIES: [&[u8]; NUM_REPLIES] = [&FETCH_REPLY_FIRST, &[]];
#[cfg(all(feature = "auth-idempotent", not(feature = "only-fetch")))]
const REPLIES: [&[u8]; NUM_REPLIES] = [
    &AUTH_REPLY_FIRST,
    &PRODUCE_REPLY_SECOND,
    &PRODUCE_REPLY_THIRD,
    &FETCH_REPLY_FOURTH,
];

/// A transport that plays a canned broker: after each written request frame it serves the
/// next canned reply, a few bytes per read (like a UART FIFO).
struct CannedBroker {
    /// Bytes of the current request frame still expected.
    request_left: usize,
    /// Length bytes of the current request seen so far.
    header: [u8; 4],
    header_len: usize,
    replies: [&'static [u8]; NUM_REPLIES],
    next: usize,
    /// The reply being served and the bytes of it already read.
    serving: &'static [u8],
}

impl CannedBroker {
    const fn new() -> Self {
        Self {
            request_left: 0,
            header: [0; 4],
            header_len: 0,
            replies: REPLIES,
            next: 0,
            serving: &[],
        }
    }
}

impl embedded_io::ErrorType for CannedBroker {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Write for CannedBroker {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            if self.request_left > 0 {
                self.request_left -= 1;
                if self.request_left == 0 {
                    // A whole request arrived: queue its reply.
                    self.serving = self.replies.get(self.next).copied().unwrap_or(&[]);
                    self.next += 1;
                }
            } else if let Some(h) = self.header.get_mut(self.header_len) {
                *h = b;
                self.header_len += 1;
                if self.header_len == 4 {
                    self.request_left = u32::from_be_bytes(self.header) as usize;
                    self.header_len = 0;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl embedded_io::Read for CannedBroker {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let n = buf.len().min(self.serving.len()).min(16);
        let (head, tail) = self.serving.split_at(n);
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(head);
        }
        self.serving = tail;
        if n == 0 {
            return Err(embedded_io::ErrorKind::TimedOut);
        }
        Ok(n)
    }
}

#[cfg(not(feature = "baseline"))]
type Client<'b> = streambus_core::embedded::blocking::Client<
    CannedBroker,
    fn() -> streambus_core::Instant,
    &'b mut [u8],
>;

// The client's whole state (connection, driver, transport handle), buffers excluded, lives
// wherever the firmware puts it (here: the stack). It must stay within 512 bytes.
#[cfg(not(feature = "baseline"))]
const _: () = assert!(size_of::<Client<'static>>() <= 512);

#[cfg(not(feature = "baseline"))]
fn now() -> streambus_core::Instant {
    streambus_core::Instant::from_millis(u64::from(TICKS.load(Ordering::Relaxed)))
}

#[cfg(not(feature = "baseline"))]
fn run(tx: &mut [u8], rx: &mut [u8]) -> u32 {
    use streambus_core::{ClientConfig, Message, MessageSetBuilder, Topic};

    let clock: fn() -> streambus_core::Instant = now;
    let mut client = Client::new(CannedBroker::new(), clock, ClientConfig::default(), tx, rx);
    let Ok(topic) = Topic::new("sensors") else {
        return 2;
    };
    #[cfg(feature = "auth-idempotent")]
    if client.authenticate(b"device-token").is_err() {
        return 7;
    }
    if !cfg!(feature = "only-fetch") {
        let mut records = [0u8; 48];
        let mut set = MessageSetBuilder::new(&mut records);
        if set.push(&Message::new(b"temp", b"21.5")).is_err() {
            return 3;
        }
        let messages = set.finish();
        match client.produce(topic, 0, messages) {
            Ok(ack) if ack.num_messages == 1 => {}
            _ => return 4,
        }
        #[cfg(feature = "auth-idempotent")]
        {
            let mut seq = streambus_core::embedded::Sequence::new(1, 0);
            match client.produce_idempotent(&mut seq, topic, 0, messages) {
                Ok(ack) if ack.base_offset == 1 && seq.next == 1 => {}
                _ => return 8,
            }
        }
    }
    if cfg!(feature = "only-produce") {
        return 1;
    }
    match client.fetch(topic, 0, 0, 1024) {
        Ok(f) => match f.messages.iter().next() {
            Some(m) if m.value == b"21.5" => 1,
            _ => 5,
        },
        Err(_) => 6,
    }
}

/// The same bytes through the same transport, without the client.
#[cfg(feature = "baseline")]
fn run(tx: &mut [u8], rx: &mut [u8]) -> u32 {
    use embedded_io::{Read, Write};
    let mut io = CannedBroker::new();
    let mut sum = 0u32;
    for _ in 0..2 {
        let frame = core::hint::black_box(&mut *tx);
        let _ = io.write(frame);
        while let Ok(n) = io.read(rx) {
            sum = sum.wrapping_add(n as u32);
        }
    }
    sum
}

#[cfg(not(test))]
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    // The buffers live on the stack: they are the caller's, not the client's static RAM.
    let mut tx = [0u8; 96];
    let mut rx = [0u8; 128];
    RESULT.store(run(&mut tx, &mut rx), Ordering::Relaxed);
    loop {
        TICKS.fetch_add(1, Ordering::Relaxed);
        core::hint::black_box(&RESULT);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// The same code on the host: `cargo test --target x86_64-unknown-linux-gnu`.
#[cfg(test)]
mod tests {
    use streambus_core::{RequestType, Response, ResponseFrame, encode_response};

    #[test]
    fn produce_and_fetch_round_trip_through_the_canned_broker() {
        let (mut tx, mut rx) = ([0u8; 96], [0u8; 128]);
        assert_eq!(super::run(&mut tx, &mut rx), 1);
    }

    /// The canned replies are what the core's encoder writes for their responses.
    #[test]
    fn the_canned_replies_are_the_cores_encodings() {
        let mut buf = [0u8; 128];
        for (id, ty, reply) in [
            (1, RequestType::Produce, &super::PRODUCE_REPLY[..]),
            (2, RequestType::Fetch, &super::FETCH_REPLY[..]),
            (1, RequestType::Fetch, &super::FETCH_REPLY_FIRST[..]),
            (1, RequestType::Authenticate, &super::AUTH_REPLY_FIRST[..]),
            (2, RequestType::Produce, &super::PRODUCE_REPLY_SECOND[..]),
            (3, RequestType::Produce, &super::PRODUCE_REPLY_THIRD[..]),
            (4, RequestType::Fetch, &super::FETCH_REPLY_FOURTH[..]),
        ] {
            let frame = ResponseFrame::new_checked(reply).expect("a whole frame");
            assert_eq!(frame.request_id(), id);
            let response = Response::parse(&frame, ty).expect("decodes");
            let n = encode_response(id, &response, &mut buf).expect("fits");
            assert_eq!(&buf[..n], reply);
        }
    }
}
