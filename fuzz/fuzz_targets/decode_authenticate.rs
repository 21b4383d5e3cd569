//! Raw bytes as an Authenticate (0x10) request payload and reply payload: malformed is
//! `InvalidRequest`, anything else re-encodes to the bytes it came from, and the credential never
//! shows in `Debug`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streambus_fuzz::check_authenticate(data));
