#!/usr/bin/env bash
# The mesh's certificates for Kubernetes: deploy/kubernetes/make-certs.sh [PODS] (default 8, the
# most pods the StatefulSet may scale to: autoscale.max_replicas x BATON_NODES_PER_REPLICA).
# A cluster CA and one certificate per pod name baton-0 .. baton-(PODS-1), made by
# `baton cluster init` and `baton cluster add-node`, written as the Secret `baton-tls` in
# deploy/kubernetes/base/tls/secret.yaml (which base/kustomization.yaml includes). The CA's key stays in
# deploy/kubernetes/base/tls/ca/ (never in the Secret): keep it to sign more pods later, by running
# this again with a larger PODS. BATON: the binary (default target/release/baton, else PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
pods=${1:-8}
[[ $pods =~ ^[1-9][0-9]*$ ]] || { echo "make-certs: PODS must be a positive number, not \"$pods\"" >&2; exit 2; }
baton=${BATON:-$root/target/release/baton}
[ -x "$baton" ] || baton=$(command -v baton) || { echo "make-certs: no baton binary (set BATON, or cargo build --release -p baton)" >&2; exit 2; }
out=$here/base/tls
ca=$out/ca
mkdir -p "$ca"
chmod 700 "$out" "$ca"
# `baton cluster` reads a cluster.toml for its names and TLS directory: one naming baton-0 on a
# local address (the pods' names do not resolve here), its certificates into tls/ca/.
cfg=$ca/cluster.toml
cat > "$cfg" <<TOML
[cluster]
name = "baton"
[model]
path = "demo:tiny"
[tls]
dir = "."
[[nodes]]
name = "baton-0"
control = "127.0.0.1:7100"
memory_gb = 1
TOML
[ -f "$ca/ca.der" ] || "$baton" cluster init "$cfg" >/dev/null
for i in $(seq 1 $((pods - 1))); do
    [ -f "$ca/baton-$i.der" ] || "$baton" cluster add-node "baton-$i" --cluster "$cfg" >/dev/null
done
{
    echo "# Written by deploy/kubernetes/make-certs.sh: the cluster CA's certificate and one certificate"
    echo "# per pod (baton-0 .. baton-$((pods - 1))). Not committed: it holds private keys."
    echo "apiVersion: v1"
    echo "kind: Secret"
    echo "metadata:"
    echo "  name: baton-tls"
    echo "type: Opaque"
    echo "data:"
    echo "  ca.der: $(base64 -w0 < "$ca/ca.der")"
    for i in $(seq 0 $((pods - 1))); do
        echo "  baton-$i.der: $(base64 -w0 < "$ca/baton-$i.der")"
        echo "  baton-$i.key.der: $(base64 -w0 < "$ca/baton-$i.key.der")"
    done
} > "$out/secret.yaml"
chmod 600 "$out/secret.yaml"
echo "make-certs: the Secret baton-tls for $pods pods is in $out/secret.yaml (the CA key stays in $ca)"
