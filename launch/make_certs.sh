#!/usr/bin/env bash
# Make a throw-away test CA and one certificate per peer for loopback runs (TLS / mutual TLS).
# usage: launch/make_certs.sh OUT_DIR [N_PEERS=4] [DAYS=2]
# writes OUT_DIR/ca.pem (+ ca.key) and OUT_DIR/peer-K.pem / peer-K.key for K in 0..N-1.
# Each peer certificate has CN=peer-K (checked with require_cert_identity) and SANs localhost and
# 127.0.0.1, and is valid both as server and as client certificate. Never use these keys in production.
set -euo pipefail
out=${1:?usage: make_certs.sh OUT_DIR [N_PEERS] [DAYS]}
n=${2:-4}
days=${3:-2}
mkdir -p "$out"
cd "$out"
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days "$days" \
  -subj "/CN=dimat-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
ext=$(mktemp)
trap 'rm -f "$ext"' EXIT
cat > "$ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
for ((k = 0; k < n; k++)); do
  openssl req -newkey rsa:2048 -nodes -keyout "peer-$k.key" -out "peer-$k.csr" -subj "/CN=peer-$k" 2>/dev/null
  openssl x509 -req -in "peer-$k.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "peer-$k.pem" \
    -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "peer-$k.csr"
done
chmod 644 ./*.pem
echo "wrote $out: ca.pem and peer-0..$((n - 1)) certificates"
