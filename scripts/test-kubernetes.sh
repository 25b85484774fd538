#!/usr/bin/env bash
# The Kubernetes deployment, checked offline (no cluster can run here): make-certs.sh writes the
# Secret with the real `baton cluster` commands; `kubectl kustomize` renders the base, gpu and
# autoscale variants and `kubernetes-validate --strict` (PyPI, installed into target/pyenv)
# accepts every object; the rendered objects hold what the mesh relies on (probes, preStop,
# stable names, GPUs, the HPA's metric); the ConfigMap's cluster.toml parses. Then the pods'
# start-node.sh runs for real on loopback: baton-0 (the seed), baton-1 joining it as a stage
# (scaling up: it takes layers), answers equal to one node's, and baton-1's preStop drain
# (scaling down: the head takes its layers back and it exits). Skipped, saying why, without
# kubectl. Every wait has a deadline.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
baton=${BATON:-$root/target/release/baton}
fail() { echo "test-kubernetes: FAILED: $*" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "test-kubernetes: SKIPPED: no kubectl (it renders the kustomizations)"; exit 0; }
[ -x "$baton" ] || fail "no baton binary at $baton"
venv=$root/target/pyenv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
[ -x "$venv/bin/kubernetes-validate" ] || "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
work=$root/target/k8s-test
rm -rf "$work"
mkdir -p "$work"
cp -r "$root/deploy/kubernetes" "$work/kubernetes"
rm -rf "$work/kubernetes/base/tls"
BATON=$baton bash "$work/kubernetes/make-certs.sh" 4 >/dev/null || fail "make-certs.sh"
for variant in . gpu autoscale; do
    kubectl kustomize "$work/kubernetes/$variant" > "$work/rendered-${variant//./base}.yaml" || fail "kubectl kustomize $variant"
    "$venv/bin/kubernetes-validate" --strict --quiet "$work/rendered-${variant//./base}.yaml" || fail "kubernetes-validate --strict rejects the $variant rendering"
done
"$venv/bin/kubernetes-validate" --strict --quiet "$work/kubernetes/autoscale/keda-scaledobject.yaml" || fail "keda-scaledobject.yaml"
"$venv/bin/python" - "$work" <<'PY' || fail "the rendered objects"
import sys, yaml, base64, tomllib
work = sys.argv[1]
def load(v):
    return {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"]): o
            for o in yaml.safe_load_all(open(f"{work}/rendered-{v}.yaml")) if o}
base, gpu, auto = load("base"), load("gpu"), load("autoscale")
sts = base[("StatefulSet", "baton")]["spec"]
c = sts["template"]["spec"]["containers"][0]
assert sts["serviceName"] == "baton-mesh", sts["serviceName"]
assert base[("Service", "baton-mesh")]["spec"]["clusterIP"] == "None" and base[("Service", "baton-mesh")]["spec"]["publishNotReadyAddresses"]
assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/metrics"
assert "drain" in c["lifecycle"]["preStop"]["exec"]["command"]
assert ("PodDisruptionBudget", "baton") in base
secret = base[("Secret", "baton-tls")]["data"]
assert {"ca.der", "baton-3.der", "baton-3.key.der"} <= set(secret) and "ca.key.der" not in secret, sorted(secret)
cfg = tomllib.loads(base[("ConfigMap", "baton-config")]["data"]["cluster.toml"])
assert cfg["nodes"][0]["name"] == "baton-0" and cfg["nodes"][0]["control"].startswith("baton-0.baton-mesh:")
g = gpu[("StatefulSet", "baton")]["spec"]["template"]["spec"]["containers"][0]
assert g["resources"]["limits"]["nvidia.com/gpu"] == "1" and "--device cuda" in {e["name"]: e.get("value") for e in g["env"]}["BATON_NODE_ARGS"]
hpa = auto[("HorizontalPodAutoscaler", "baton")]["spec"]
assert hpa["metrics"][0]["external"]["metric"]["name"] == "baton_desired_replicas" and hpa["scaleTargetRef"]["kind"] == "StatefulSet"
print("test-kubernetes: rendered objects hold the probes, preStop drain, stable names, certificates, GPUs and the HPA")
PY
# The ConfigMap's cluster.toml as Baton reads it (its pod name made local).
sed -e 's/baton-0\.baton-mesh/localhost/g' -e "s|/etc/baton/tls|$work/kubernetes/base/tls/ca|" "$work/kubernetes/base/cluster.toml" > "$work/cluster-local.toml"
"$baton" cluster check "$work/cluster-local.toml" >/dev/null || fail "baton cluster check rejects the ConfigMap's cluster.toml"

# start-node.sh for real: two "pods" on loopback addresses of their own.
run=$work/run
mkdir -p "$run"
cat > "$run/cluster.toml" <<TOML
[cluster]
name = "baton"
[model]
path = "demo:tiny"
[tls]
dir = "$work/kubernetes/base/tls/ca"
[placement]
mode = "auto"
replicas = 1
[[nodes]]
name = "baton-0"
control = "127.0.13.1:7100"
http = "127.0.13.1:8080"
memory_gb = 1
TOML
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
pod() {  # pod NAME IP [drain]
    exec env PATH="$(dirname "$baton"):$PATH" BATON_NODE_PID="${BATON_NODE_PID:-1}" BATON_CONFIG="$run/cluster.toml" POD_NAME="$1" POD_IP="$2" BATON_MEMORY_GB=1 \
        BATON_NODES_PER_REPLICA=2 BATON_NODE_ARGS="--threads 1 --kv-cache-mb 64" UCX_TLS=tcp \
        sh "$work/kubernetes/base/start-node.sh" ${3:-}
}
wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || { tail -n 15 "$run"/*.log >&2; fail "$what"; }
        sleep 0.5
    done
}
pod baton-0 127.0.13.1 > "$run/baton-0.log" 2>&1 &
pids+=($!)
wait_for 120 "baton-0 never answered /health" curl -sf http://127.0.13.1:8080/health -o /dev/null
layers_of() { curl -sf http://127.0.13.1:8080/v1/mesh | "$venv/bin/python" -c '
import json, sys
v = json.load(sys.stdin)
print(json.dumps(v))' > "$run/mesh.json" && grep -q "$1" "$run/mesh.json"; }
answers_match() {  # answers_match URL
    local want got
    want=$("$baton" generate --preset tiny --prompt "Scaling a StatefulSet" --max-tokens 12 --temperature 0 --json | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["token_ids"])')
    got=$(curl -sf -m 60 "$1/v1/completions" -H 'content-type: application/json' \
        -d '{"model": "tiny-seed0", "prompt": "Scaling a StatefulSet", "max_tokens": 12, "temperature": 0, "return_token_ids": true}' \
        | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["token_ids"])') || fail "POST $1/v1/completions"
    [ "$got" = "$want" ] || fail "$1 answered $got, one node $want"
}
answers_match http://127.0.13.1:8080
# Scale up: baton-1 (ordinal 1, two nodes per replica) joins replica 0 as a stage.
pod baton-1 127.0.13.2 > "$run/baton-1.log" 2>&1 &
b1=$!
pids+=($b1)
wait_for 120 "baton-1 never answered /health" curl -sf http://127.0.13.2:8080/health -o /dev/null
serving() { "$venv/bin/python" - "$run/mesh.json" "$1" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
node = next((n for n in v.get("nodes", []) if n.get("name") == sys.argv[2]), None)
sys.exit(0 if node and node.get("layers") else 1)
PY
}
baton1_serves() { curl -sf http://127.0.13.1:8080/v1/mesh -o "$run/mesh.json" && serving baton-1; }
wait_for 120 "baton-1 never took layers (the head's /v1/mesh: $(cat "$run/mesh.json" 2>/dev/null))" baton1_serves
echo "test-kubernetes: scaled up: baton-1 joined through the seed and serves layers"
answers_match http://127.0.13.1:8080
answers_match http://127.0.13.2:8080
# Scale down: the preStop hook drains baton-1; the head takes its layers back and it exits.
# (In a pod the node is process 1; here, baton-1's pid.)
BATON_NODE_PID=$b1 pod baton-1 127.0.13.2 drain > "$run/baton-1-prestop.log" 2>&1 &
prestop=$!
gone() { ! kill -0 "$b1" 2>/dev/null; }
wait_for 120 "baton-1 did not leave after its preStop drain" gone
wait_for 30 "the preStop hook did not return once baton-1 left" bash -c "! kill -0 $prestop 2>/dev/null"
grep -q "draining" "$run/baton-1-prestop.log" || fail "the preStop hook did not drain: $(cat "$run/baton-1-prestop.log")"
answers_match http://127.0.13.1:8080
echo "test-kubernetes: scaled down: baton-1 drained (preStop) and left; baton-0 answers as one node"
# The seed's pod restarts (kill -9, then its container again): with baton-1 back as a stage,
# baton-1 heads the replica meanwhile (succession); baton-0 comes back alone (its only seed is
# itself), and baton-1, announcing to the seed it misses, brings it into the mesh again.
pod baton-1 127.0.13.2 > "$run/baton-1-again.log" 2>&1 &
pids+=($!)
wait_for 120 "baton-1 never took layers again" baton1_serves
kill -9 "${pids[0]}"
wait_for 30 "baton-0 did not die" bash -c "! kill -0 ${pids[0]} 2>/dev/null"
pod baton-0 127.0.13.1 > "$run/baton-0-again.log" 2>&1 &
pids+=($!)
both_serve() { curl -sf http://127.0.13.2:8080/v1/mesh -o "$run/mesh.json" && serving baton-0 && serving baton-1; }
wait_for 180 "the restarted seed never served layers again (/v1/mesh: $(cat "$run/mesh.json" 2>/dev/null))" both_serve
answers_match http://127.0.13.1:8080
answers_match http://127.0.13.2:8080
echo "test-kubernetes: the seed's pod restarted and rejoined the mesh; both pods answer as one node"
echo "test-kubernetes: passed"
