//! An arbitrary request or response, encoded, framed, decoded and compared; too-small
//! buffers must report the size needed and stay untouched.
#![no_main]

use streambus_fuzz::RoundtripInput;

libfuzzer_sys::fuzz_target!(|input: RoundtripInput| streambus_fuzz::check_roundtrip(&input));
