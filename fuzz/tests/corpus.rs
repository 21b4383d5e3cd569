//! Replays the committed `storage_recovery` corpus through its checks (`cargo test`, no
//! libFuzzer), so a change to the storage engine or to the checks meets every input the
//! fuzzer kept.

use std::fs;
use std::path::Path;

#[test]
fn storage_recovery_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/storage_recovery");
    let mut n = 0;
    for ent in fs::read_dir(&dir).expect("the storage_recovery corpus") {
        let path = ent.expect("a corpus entry").path();
        let data = fs::read(&path).expect("read a corpus file");
        streambus_fuzz::storage::check_recovery(&data);
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
}

#[test]
fn decode_authenticate_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/decode_authenticate");
    let mut n = 0;
    for ent in fs::read_dir(&dir).expect("the decode_authenticate corpus") {
        let data = fs::read(ent.expect("a corpus entry").path()).expect("read a corpus file");
        streambus_fuzz::check_authenticate(&data);
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
}
