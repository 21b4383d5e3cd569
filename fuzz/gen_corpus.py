#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ from the golden vectors of the protocol
spec (shared/protocol-v1.md, section 7). Run from anywhere: python3 fuzz/gen_corpus.py

decode_frame and decode_stream inputs start with a config byte (0 = default maximum frame,
CRC not repaired; see src/lib.rs); decode_stream's next byte is the number of chunk-size bytes
that follow. roundtrip inputs are `arbitrary` bytes, so the golden frames there are only a
starting point of varied bytes for the mutator, not encodings of requests.

storage_recovery seeds (not golden vectors of the spec, but inputs in its layout, see
src/storage.rs): raw mode (first byte even) segments built per docs/storage.md, intact, torn,
with garbage, at another base offset and with a partition.toml; prefix mode (first byte odd;
0b11: with idempotent producers) inputs are `arbitrary` bytes.
"""
import struct
import zlib
from pathlib import Path

ERROR_MESSAGE = b"topic missing-topic-raw does not exist"
assert len(ERROR_MESSAGE) == 38

REQUESTS = {
    "health_check_request": "00000010 0000000000000001 07 01 0000 daa0bd51",
    "produce_request": "0000003b 0000000000000002 01 01 0001 00000001 74 00000000 00000001 "
    "0000000000000000 0000000000000001 00000001 6b 00000001 76 00000000 608b9119",
}
RESPONSES = {
    "produce_response": "00000023 0000000000000002 00 0000 0000000000000000 00000001 "
    "0000000000000001 d04e446a",
    "health_check_response": "00000022 0000000000000001 00 0000 00000007 6865616c746879 "
    "0000000000000002 23bf1731",
    "error_response": "00000039 000000000000006a 01 0008 00000026 "
    + ERROR_MESSAGE.hex()
    + " d304c1bf",
}


def frame(hex_fields: str) -> bytes:
    b = bytes.fromhex(hex_fields.replace(" ", ""))
    assert int.from_bytes(b[:4], "big") == len(b) - 4, hex_fields
    return b


def record(offset: int, key: bytes, value: bytes, ts: int = 1_000) -> bytes:
    """One message record (protocol section 3), without headers."""
    return (
        struct.pack(">qqI", offset, ts, len(key)) + key
        + struct.pack(">I", len(value)) + value + struct.pack(">I", 0)
    )


def segment(base: int, batches: list[list[bytes]]) -> tuple[bytes, bytes]:
    """A segment's .idx and .log (docs/storage.md, On-disk format) holding the batches."""
    idx, log, offset = b"", b"", base
    for i, values in enumerate(batches):
        records = b"".join(record(offset + k, b"k", v) for k, v in enumerate(values))
        entry = struct.pack(
            ">qqqIII", offset, len(log), 1_000 + i, len(values), len(records),
            zlib.crc32(records),
        )
        idx += entry + struct.pack(">I", zlib.crc32(entry))
        log += records
        offset += len(values)
    return idx, log


def storage_raw(idx: bytes, log: bytes, base: int | None = None, toml: bytes | None = None,
                log_start: int | None = None) -> bytes:
    """A raw-mode storage_recovery input (layout in fuzz/src/storage.rs, check_raw)."""
    mode = (0b10 if base is not None else 0) | (0b100 if toml or log_start is not None else 0)
    mode |= 0b1000 if log_start is not None else 0
    out = bytes([mode])
    if base is not None:
        out += struct.pack(">Q", base)
    out += struct.pack(">H", len(idx)) + idx
    if log_start is not None:
        out += struct.pack(">q", log_start)
    elif toml is not None:
        out += struct.pack(">H", len(toml)) + toml
    return out + log


def storage_seeds() -> dict[str, bytes]:
    batches = [[b"a"], [b"bb", b"ccc"], [b"", b"dddd", b"e" * 40], [b"f" * 7]]
    idx, log = segment(0, batches)
    idx5, log5 = segment(5, batches)
    return {
        "storage_raw_intact": storage_raw(idx, log),
        "storage_raw_torn_log": storage_raw(idx, log[:-3]),
        "storage_raw_torn_idx": storage_raw(idx[:-7], log),
        "storage_raw_garbage": storage_raw(idx + b"\xff" * 17, log + b"garbage"),
        "storage_raw_flipped": storage_raw(idx, log[:40] + b"\x80" + log[41:]),
        "storage_raw_base5": storage_raw(idx5, log5, base=5),
        "storage_raw_log_start": storage_raw(idx5, log5, base=5, log_start=7),
        "storage_raw_toml": storage_raw(idx, log, toml=b"format = 1\nlog_start = 2\n"),
        "storage_prefix_small": b"\x01" + bytes(range(64)),
        "storage_prefix_large": b"\x01" + bytes((i * 37) % 256 for i in range(600)),
        # Prefix mode with idempotent producers and .pidx damage (first byte 0b11).
        "storage_prefix_idempotent_small": b"\x03" + bytes(range(64)),
        "storage_prefix_idempotent_large": b"\x03" + bytes((i * 37) % 256 for i in range(600)),
        "storage_prefix_idempotent_dense": b"\x03" + bytes((i * 101 + 7) % 256 for i in range(900)),
    }


def main() -> None:
    root = Path(__file__).resolve().parent / "corpus"
    requests = {k: frame(v) for k, v in REQUESTS.items()}
    responses = {k: frame(v) for k, v in RESPONSES.items()}
    frames = {**requests, **responses}
    request_stream = b"".join(requests.values())
    response_stream = b"".join(responses.values())

    seeds = {
        "decode_frame": {
            **{name: b"\x00" + f for name, f in frames.items()},
            "request_stream": b"\x00" + request_stream,
            "response_stream": b"\x00" + response_stream,
            # Maximum Length 8 * 4 = 32: the Produce request (59) is refused on its 4 bytes.
            "request_stream_max32": b"\x04" + request_stream,
        },
        "decode_stream": {
            "requests_bytewise": b"\x00\x00" + request_stream,
            "responses_bytewise": b"\x00\x00" + response_stream,
            "requests_chunks_3_17_64": b"\x00\x03" + bytes([2, 16, 63]) + request_stream,
            "responses_chunks_5_40": b"\x00\x02" + bytes([4, 39]) + response_stream,
            "requests_max32": b"\x04\x01\x07" + request_stream,
        },
        "roundtrip": {name: f for name, f in frames.items()},
        "storage_recovery": storage_seeds(),
    }
    for target, files in seeds.items():
        d = root / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / f"golden_{name}").write_bytes(data)


if __name__ == "__main__":
    main()
