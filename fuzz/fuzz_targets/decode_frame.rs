//! Raw bytes (after one config byte) through the frame decoders, frame validation and every
//! payload parser; parsed values must re-encode to frames that parse to the same value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streambus_fuzz::check_frames(data));
