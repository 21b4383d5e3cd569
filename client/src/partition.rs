//! Key-hash partitioning.

/// The partition of a keyed record: the 32-bit FNV-1a hash of the key bytes, modulo the
/// partition count. Fixed by this documentation, so it is the same across runs, platforms and
/// versions (the hash: offset basis 0x811c9dc5; per byte `h = (h ^ byte) * 0x01000193`
/// wrapping).
///
/// Test vectors (hash, then the partition among 12): `b""` 0x811c9dc5 → 1; `b"a"` 0xe40c292c
/// → 4; `b"foobar"` 0xbf9cf968 → 4; `b"customer-42"` 0xfe68adbe → 10.
///
/// `partitions` of 0 gives 0.
///
/// ```
/// assert_eq!(streambus_client::fnv1a32(b"foobar"), 0xbf9c_f968);
/// assert_eq!(streambus_client::partition_for_key(b"a", 12), 4);
/// ```
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    fnv1a32(key).checked_rem(partitions).unwrap_or(0)
}

/// 32-bit FNV-1a of `bytes`.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        assert_eq!(fnv1a32(b"customer-42"), 0xfe68_adbe);
        assert_eq!(partition_for_key(b"", 12), 1);
        assert_eq!(partition_for_key(b"a", 12), 4);
        assert_eq!(partition_for_key(b"foobar", 12), 4);
        assert_eq!(partition_for_key(b"customer-42", 12), 10);
        assert_eq!(partition_for_key(b"x", 0), 0);
    }
}
