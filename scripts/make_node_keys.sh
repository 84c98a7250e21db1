#!/usr/bin/env bash
# Make SuperNode authentication keys (ECDSA P-384, as Flower requires) for N clients.
#
#   scripts/make_node_keys.sh N [OUT_DIR]     (default OUT_DIR: certificates/nodes/)
#
# Server:  federated_mergenet_server.py ... --auth-supernode-keys OUT/     (every OUT/*.pub may join)
# Client i: federated_mergenet_client.py ... --auth-supernode-private-key OUT/client_i
# Each client machine gets only its own private key; the server needs only the .pub files.
# Node authentication needs TLS (scripts/make_certificates.sh).
set -euo pipefail

if [ "$#" -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    [ "$#" -ge 1 ] && exit 0 || exit 2
fi
if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: N must be a positive number of clients, got '$1'" >&2
    exit 2
fi
N="$1"
OUT="${2:-certificates/nodes}"
mkdir -p "$OUT"
for ((i = 0; i < N; i++)); do
    rm -f "$OUT/client_$i" "$OUT/client_$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedmergenet-client-$i" -f "$OUT/client_$i"
done
echo "node keys for clients 0..$((N - 1)) in $OUT (client_i private, client_i.pub public)"
