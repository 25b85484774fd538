#!/usr/bin/env bash
# Start every node of a cluster: scripts/bootstrap.sh [cluster.toml]; stop them: --stop.
#
# Nodes whose control address is on loopback start here as local processes (logs and pid files
# under .baton/ beside cluster.toml). Other nodes start over ssh: the script copies cluster.toml
# and that node's certificates to ~/baton-cluster/ on the host and runs `baton node` there
# (`baton` must be on the remote PATH; remote start is untested so far). The cluster's
# certificates are made first if missing. The script waits until the pipeline head answers
# /health, then prints the endpoint, the logs and `baton status`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cfg=cluster.toml
stop=0
for arg in "$@"; do
    case $arg in
        --stop) stop=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) cfg=$arg ;;
    esac
done
[ -f "$cfg" ] || { echo "bootstrap: $cfg: no such file" >&2; exit 2; }
cfg=$(cd "$(dirname "$cfg")" && pwd)/$(basename "$cfg")
state=$(dirname "$cfg")/.baton
mkdir -p "$state/logs"
baton=${BATON:-$root/target/release/baton}
if [ ! -x "$baton" ]; then
    echo "bootstrap: building baton (cargo build --release -p baton)"
    (cd "$root" && cargo build --release -q -p baton)
fi

# name host http tls_dir, one line per node, from cluster.toml (Python 3.11's tomllib).
nodes=$(python3 - "$cfg" <<'PY'
import os, sys, tomllib
path = sys.argv[1]
c = tomllib.load(open(path, "rb"))
tls = c.get("tls", {}).get("dir", "cluster-tls")
tls = tls if os.path.isabs(tls) else os.path.join(os.path.dirname(path), tls)
for n in c.get("nodes", []):
    host = n["control"].rsplit(":", 1)[0].strip("[]")
    print(n["name"], host, n.get("http", "-"), tls)
PY
)
head=$("$baton" cluster check "$cfg" | awk '/layers +0\.\./ {print $1; exit}')
[ -n "$head" ] || { echo "bootstrap: no node holds layer 0" >&2; exit 2; }
is_local() { case $1 in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac; }

if [ "$stop" = 1 ]; then
    while read -r name host _ _; do
        if is_local "$host"; then
            if [ -f "$state/$name.pid" ]; then
                kill "$(cat "$state/$name.pid")" 2>/dev/null && echo "stopped $name" || echo "$name was not running"
                rm -f "$state/$name.pid"
            fi
        else
            ssh "$host" "pkill -f 'baton node --cluster .* --name $name'" && echo "stopped $name on $host" || true
        fi
    done <<< "$nodes"
    exit 0
fi

tls=$(echo "$nodes" | head -n1 | awk '{print $4}')
[ -f "$tls/ca.der" ] || "$baton" cluster init "$cfg"

start() {
    local name=$1 host=$2 tls=$4
    if is_local "$host"; then
        nohup "$baton" node --cluster "$cfg" --name "$name" > "$state/logs/$name.log" 2>&1 &
        echo $! > "$state/$name.pid"
        echo "started $name (pid $!, log $state/logs/$name.log)"
    else
        ssh "$host" "mkdir -p ~/baton-cluster/cluster-tls"
        scp -q "$cfg" "$host:baton-cluster/cluster.toml"
        scp -q "$tls/ca.der" "$tls/$name.der" "$tls/$name.key.der" "$host:baton-cluster/cluster-tls/"
        ssh "$host" "cd ~/baton-cluster && nohup baton node --cluster cluster.toml --name $name > $name.log 2>&1 &"
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
for _ in $(seq 1 600); do
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
