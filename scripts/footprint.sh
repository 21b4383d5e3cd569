#!/usr/bin/env bash
# Builds examples/firmware for thumbv7em-none-eabihf (opt-level "z", LTO, panic = abort,
# feature crc-small-table) with and without the embedded client, and prints the sizes.
#
#   scripts/footprint.sh            # table on stdout
#   MAX_CLIENT_TEXT=5632 scripts/footprint.sh   # also fail if the client's own .text is larger
#
# The last lines give the client's own .text with both calls, with produce or fetch alone
# (features only-produce, only-fetch), and with authenticate and idempotent produce added
# (feature auth-idempotent); the gate applies to produce + fetch.
#
# "client" = image with the client minus the baseline image (same canned transport, no client).
# "client, own code" leaves out compiler-builtins' memcpy/memset (libc routines every firmware
# links anyway; coreMQTT's published figures leave them out too).
set -euo pipefail
cd "$(dirname "$0")/../examples/firmware"

sysroot="$(rustc --print sysroot)"
size="$(find "$sysroot" -name llvm-size -type f | head -n1)"
nm="$(find "$sysroot" -name llvm-nm -type f | head -n1)"
if [[ -z "$size" || -z "$nm" ]]; then
    echo "llvm-size not found: rustup component add llvm-tools-preview" >&2
    exit 1
fi

target=thumbv7em-none-eabihf
# The firmware's produce/fetch round trip, run on the host first: the image measured works.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo test --quiet --target "$host" >/dev/null
cargo test --quiet --target "$host" --features auth-idempotent >/dev/null
cargo build --quiet --release --target "$target"
cargo build --quiet --release --target "$target" --features baseline --target-dir target/baseline
cargo build --quiet --release --target "$target" --features only-produce --target-dir target/only-produce
cargo build --quiet --release --target "$target" --features only-fetch --target-dir target/only-fetch
cargo build --quiet --release --target "$target" --features auth-idempotent --target-dir target/auth-idempotent
full="target/$target/release/streambus-firmware-example"
base="target/baseline/$target/release/streambus-firmware-example"

# section size of $2 in ELF $1 (0 if absent)
sec() { "$size" -A "$1" | awk -v s="$2" '$1 == s { print $2; f = 1 } END { if (!f) print 0 }'; }
# .text bytes of compiler-builtins' mem routines in ELF $1
builtins() {
    local s=0 sz
    while read -r sz; do s=$(( s + 16#$sz )); done < <(
        "$nm" -S --demangle "$1" |
            awk 'tolower($3) == "t" && ($4 ~ /compiler_builtins/ || $4 ~ /^__aeabi_mem/) { print $2 }')
    echo "$s"
}

ft=$(sec "$full" .text); fr=$(sec "$full" .rodata); fd=$(( $(sec "$full" .data) + $(sec "$full" .bss) ))
bt=$(sec "$base" .text); br=$(sec "$base" .rodata); bd=$(( $(sec "$base" .data) + $(sec "$base" .bss) ))
fb=$(builtins "$full"); bb=$(builtins "$base")
ct=$(( ft - bt )); cr=$(( fr - br )); cd=$(( fd - bd ))
own=$(( (ft - fb) - (bt - bb) ))
# own .text of the client in the image built with feature $1
own_of() {
    local elf="target/$1/$target/release/streambus-firmware-example"
    echo $(( ($(sec "$elf" .text) - $(builtins "$elf")) - (bt - bb) ))
}
own_produce=$(own_of only-produce); own_fetch=$(own_of only-fetch)
own_auth_idem=$(own_of auth-idempotent)

printf '%-36s %8s %8s %12s\n' "image ($target, opt z, LTO)" .text .rodata ".data+.bss"
printf '%-36s %8d %8d %12d\n' "whole firmware" "$ft" "$fr" "$fd"
printf '%-36s %8d %8d %12d\n' "baseline (transport, no client)" "$bt" "$br" "$bd"
printf '%-36s %8d %8d %12d\n' "client (difference)" "$ct" "$cr" "$cd"
printf '%-36s %8d %8s %12s\n' "client, own code (no memcpy/memset)" "$own" "" ""
printf 'client rodata includes the 1 KiB CRC table (feature crc-small-table)\n'
printf '\n%-52s %8s\n' "client's own .text by calls" .text
printf '%-52s %8d\n' "produce + fetch" "$own" "produce only" "$own_produce" "fetch only" "$own_fetch"
printf '%-52s %8d\n' "produce + fetch + authenticate + idempotent produce" "$own_auth_idem"

if [[ -n "${MAX_CLIENT_TEXT:-}" && "$own" -gt "$MAX_CLIENT_TEXT" ]]; then
    echo "client .text $own > $MAX_CLIENT_TEXT" >&2
    exit 1
fi
