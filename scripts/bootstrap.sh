#!/usr/bin/env bash
# Start every node of a cluster: scripts/bootstrap.sh [cluster.toml]; stop them: --stop.
# Run again, it starts the local nodes that are not running (a node that was killed comes back
# as a new generation and the head takes it in again).
#
# Nodes whose control address is on loopback start here as local processes (logs and pid files
# under .baton/ beside cluster.toml). Other nodes start over ssh: the script copies cluster.toml
# and that node's certificates to ~/baton-cluster/ on the host and runs `baton node` there (the
# model path in cluster.toml must exist there too). The cluster's certificates are made first if
# missing. The script waits until the pipeline head answers /health, then prints the endpoint,
# the logs and `baton status`. UCX_TLS and the rest of the environment reach local nodes as is.
# Environment: BATON (local binary), BATON_REMOTE_BATON (remote binary, default `baton` on the
# remote PATH), BATON_SSH / BATON_SCP (default ssh / scp), BATON_REMOTE_NODES (names of nodes to
# start over ssh even on a loopback address, e.g. to try the remote path against localhost).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cfg=cluster.toml
stop=0
for arg in "$@"; do
    case $arg in
        --stop) stop=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) cfg=$arg ;;
    esac
done
[ -f "$cfg" ] || { echo "bootstrap: $cfg: no such file" >&2; exit 2; }
cfg=$(cd "$(dirname "$cfg")" && pwd)/$(basename "$cfg")
state=$(dirname "$cfg")/.baton
mkdir -p "$state/logs"
baton=${BATON:-$root/target/release/baton}
remote_baton=${BATON_REMOTE_BATON:-baton}
ssh=${BATON_SSH:-ssh}
scp=${BATON_SCP:-scp}
if [ ! -x "$baton" ]; then
    echo "bootstrap: building baton (cargo build --release -p baton)"
    (cd "$root" && cargo build --release -q -p baton)
fi

# name host http tls_dir tls_dir_as_written, one line per node, from cluster.toml (Python
# 3.11's tomllib).
nodes=$(python3 - "$cfg" <<'PY'
import os, sys, tomllib
path = sys.argv[1]
c = tomllib.load(open(path, "rb"))
written = c.get("tls", {}).get("dir", "cluster-tls")
tls = written if os.path.isabs(written) else os.path.join(os.path.dirname(path), written)
for n in c.get("nodes", []):
    host = n["control"].rsplit(":", 1)[0].strip("[]")
    print(n["name"], host, n.get("http", "-"), tls, written)
PY
)
head=$("$baton" cluster check "$cfg" | awk '/layers +0\.\./ {print $1; exit}')
[ -n "$head" ] || { echo "bootstrap: no node holds layer 0" >&2; exit 2; }
# is_local NAME HOST
is_local() {
    local remote=${BATON_REMOTE_NODES:-}
    case " ${remote//,/ } " in *" $1 "*) return 1 ;; esac
    case $2 in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac
}

if [ "$stop" = 1 ]; then
    while read -r name host _ _ _; do
        if is_local "$name" "$host"; then
            if [ -f "$state/$name.pid" ]; then
                kill "$(cat "$state/$name.pid")" 2>/dev/null && echo "stopped $name" || echo "$name was not running"
                rm -f "$state/$name.pid"
            fi
        else
            $ssh "$host" "pkill -f 'node --cluster cluster.toml --name $name\$'" && echo "stopped $name on $host" || true
        fi
    done <<< "$nodes"
    exit 0
fi

tls=$(echo "$nodes" | head -n1 | awk '{print $4}')
[ -f "$tls/ca.der" ] || "$baton" cluster init "$cfg"

start() {
    local name=$1 host=$2 tls=$4 written=$5
    if is_local "$name" "$host"; then
        # Running again starts only the nodes that are not running (one killed, say).
        if [ -f "$state/$name.pid" ] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
            echo "$name is running (pid $(cat "$state/$name.pid"))"
            return
        fi
        nohup "$baton" node --cluster "$cfg" --name "$name" > "$state/logs/$name.log" 2>&1 &
        echo $! > "$state/$name.pid"
        echo "started $name (pid $!, log $state/logs/$name.log)"
    else
        # The certificates go where the copied cluster.toml says: its [tls] dir, relative to
        # ~/baton-cluster unless absolute.
        local remote_tls=$written
        case $written in /*) ;; *) remote_tls=baton-cluster/$written ;; esac
        $ssh "$host" "mkdir -p ~/baton-cluster $remote_tls && chmod 700 $remote_tls"
        $scp -q "$cfg" "$host:baton-cluster/cluster.toml"
        $scp -q "$tls/ca.der" "$tls/$name.der" "$tls/$name.key.der" "$host:$remote_tls/"
        $ssh "$host" "cd ~/baton-cluster && nohup $remote_baton node --cluster cluster.toml --name $name > $name.log 2>&1 < /dev/null &"
        echo "started $name on $host (log ~/baton-cluster/$name.log there)"
    fi
}
# Stages first, the head last (it connects to the others).
while read -r line; do
    set -- $line
    [ "$1" = "$head" ] || start "$@"
done <<< "$nodes"
start $(echo "$nodes" | awk -v h="$head" '$1 == h')
http=$(echo "$nodes" | awk -v h="$head" '$1 == h {print $3}')
# While waiting, every 4 s: which nodes are up, which are still loading.
progress() {
    "$baton" status --cluster "$cfg" --json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
def word(r):
    s = r["state"]
    if not s.get("up"):
        return "down"
    if s.get("loading"):
        l = s["loading"]
        return "up (loading %.0f%%)" % min(100, 100 * l["mib_done"] / max(1, l["mib_total"]))
    if r["role"] == "head" and not s.get("ready"):
        return "up (loading)"
    if r["role"] != "head" and not s.get("loaded"):
        return "up (no layers yet)"
    return "up (layers %s..%s)" % tuple(r["layers"]) if r.get("layers") else "up"
print("waiting for the mesh: " + ", ".join("%s %s" % (r["node"], word(r)) for r in v["nodes"]))' || true
}
for i in $(seq 1 600); do
    [ $((i % 8)) = 0 ] && progress
    if curl -sf "http://$http/health" >/dev/null 2>&1; then
        echo
        echo "the mesh is ready: OpenAI API at http://$http/v1 (logs in $state/logs)"
        "$baton" status --cluster "$cfg"
        exit 0
    fi
    sleep 0.5
done
echo "bootstrap: the head did not become ready in 300 s; see $state/logs" >&2
exit 1
