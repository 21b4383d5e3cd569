#!/usr/bin/env bash
# Makes a CA, a broker certificate for localhost and 127.0.0.1, and a client certificate
# (CN=alice) signed by it, with openssl, in DIR (default ./tls): ca.pem, server.pem,
# server-key.pem, client.pem, client-key.pem. For trying TLS out and for scripts/bench-tls.sh;
# a real deployment gets its certificates from its own CA.
#
#   scripts/tls-certs.sh [DIR]
set -euo pipefail
dir="${1:-tls}"
mkdir -p "$dir"
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 365 -subj "/CN=StreamBus test CA" -out ca.pem
leaf() { # name, subject, extensions
    key "$1-key.pem"
    openssl req -new -key "$1-key.pem" -subj "$2" -out "$1.csr"
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
leaf server "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
leaf client "/O=Example/CN=alice" "extendedKeyUsage=clientAuth"
echo "made $dir/ca.pem, $dir/server.pem, $dir/server-key.pem, $dir/client.pem, $dir/client-key.pem"
