#!/usr/bin/env bash
# Make a private CA and a SuperLink certificate for HOST (an IP address or a DNS name).
#
#   scripts/make_certificates.sh HOST [OUT_DIR]     (default OUT_DIR: certificates/)
#
# Server:  federated_mergenet_server.py --ssl-ca-certfile OUT/ca.crt --ssl-certfile OUT/server.pem --ssl-keyfile OUT/server.key
# Clients: federated_mergenet_client.py --root-certificates OUT/ca.crt --server_address HOST:9092
# Copy only ca.crt to client machines; ca.key and server.key stay with the server's owner.
set -euo pipefail

if [ "$#" -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [ "$#" -ge 1 ] && exit 0 || exit 2
fi
HOST="$1"
OUT="${2:-certificates}"
mkdir -p "$OUT"
cd "$OUT"

if [[ "$HOST" =~ ^[0-9.]+$ || "$HOST" == *:* ]]; then
    SAN="IP:$HOST,DNS:localhost,IP:127.0.0.1"
else
    SAN="DNS:$HOST,DNS:localhost,IP:127.0.0.1"
fi

openssl req -x509 -newkey rsa:2048 -nodes -days 365 -sha256 -subj "/CN=fedmergenet-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$HOST" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
    "$SAN" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "CA: $OUT/ca.crt  server certificate: $OUT/server.pem (SAN $SAN)  key: $OUT/server.key"
