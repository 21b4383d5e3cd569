//! The same bytes framed whole and fed in chunks whose sizes come from the input: both must
//! give the same frames, the same fatal error and the same incomplete rest — through
//! `FrameDecoder`, through a `ServerConnection` answering as a broker does, and through a
//! `ClientConnection` with requests in flight, as the drivers feed it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streambus_fuzz::check_stream(data));
