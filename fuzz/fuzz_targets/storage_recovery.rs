//! Arbitrary or damaged segment files through `Storage::open` and a full fetch.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streambus_fuzz::storage::check_recovery(data));
