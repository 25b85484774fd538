#!/usr/bin/env bash
# What operators look at, tested for real on a three-node mesh (scripts/bootstrap.sh, on
# loopback addresses of its own) under load from `baton bench`:
# - the dashboard: headless Chromium (Debian's, driven by playwright-core from npm) opens
#   /dashboard at an entry node and waits, with a deadline, until every node's name, a latency
#   chart with points and a non-zero throughput are on the page; a screenshot goes to
#   target/dashboard.png;
# - Prometheus and Grafana: a real Prometheus (Debian's) scrapes every node with the
#   configuration `baton cluster prometheus` writes, and every PromQL expression of
#   deploy/grafana/baton.json returns data through Prometheus' HTTP API.
# Installs chromium, prometheus (apt-get) and playwright-core (npm, under target/) if missing;
# each part is skipped, saying why, where it cannot run. Every wait has a deadline.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
baton=${BATON:-$root/target/release/baton}
note() { echo "test-observability: $*"; }
fail() { echo "test-observability: FAILED: $*" >&2; exit 1; }
# apt_install COMMAND PACKAGE...: true when COMMAND is there (installed now if need be).
apt_install() {
    local cmd=$1
    shift
    command -v "$cmd" >/dev/null && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@") >/dev/null 2>&1
    command -v "$cmd" >/dev/null
}
[ -x "$baton" ] || fail "no baton binary at $baton"
work=$root/target/observability-test
mkdir -p "$work"
if [ ! -d "$work/node_modules/playwright-core" ]; then
    (cd "$work" && npm install --silent --no-audit --no-fund --no-save playwright-core@1 >/dev/null 2>&1) || skip "npm could not install playwright-core"
fi
cat > "$work/cluster.toml" <<TOML
[cluster]
name = "dashboard"
[model]
path = "demo:tiny"
[placement]
mode = "auto"
[[nodes]]
name = "node-a"
control = "127.0.14.1:7101"
http = "127.0.14.1:8080"
memory_gb = 1
[[nodes]]
name = "node-b"
control = "127.0.14.2:7101"
http = "127.0.14.2:8080"
memory_gb = 1
[[nodes]]
name = "node-c"
control = "127.0.14.3:7101"
http = "127.0.14.3:8080"
memory_gb = 1
TOML
rm -rf "$work/cluster-tls" "$work/.baton"
bench=""
cleanup() {
    [ -n "$bench" ] && kill "$bench" 2>/dev/null
    BATON=$baton bash "$root/scripts/bootstrap.sh" "$work/cluster.toml" --stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
BATON=$baton timeout 300 bash "$root/scripts/bootstrap.sh" "$work/cluster.toml" > "$work/bootstrap.log" 2>&1 || { cat "$work/bootstrap.log" >&2; fail "bootstrap.sh"; }
head=$(grep -o 'OpenAI API at http://[0-9.:]*' "$work/bootstrap.log" | sed 's|.*http://||' | head -n1)
[ -n "$head" ] || { cat "$work/bootstrap.log" >&2; fail "bootstrap.sh printed no endpoint"; }
# An entry node (not the head) serves the dashboard too: open it there.
entry=$(for ip in 127.0.14.1 127.0.14.2 127.0.14.3; do [ "$ip:8080" = "$head" ] || { echo "$ip:8080"; break; }; done)
"$baton" bench --url "http://$head" --concurrency 4 --num-requests 100000 --input-len 32 --output-len 64 > "$work/bench.log" 2>&1 &
bench=$!
browser=""
if ! apt_install chromium chromium fonts-dejavu-core; then
    note "dashboard: SKIPPED: no chromium, and no apt-get as root to install it"
elif ! command -v npm >/dev/null; then
    note "dashboard: SKIPPED: no npm (for playwright-core)"
elif [ ! -d "$work/node_modules/playwright-core" ] && ! (cd "$work" && npm install --silent --no-audit --no-fund --no-save playwright-core@1 >/dev/null 2>&1); then
    note "dashboard: SKIPPED: npm could not install playwright-core"
else
    browser=1
fi
if [ -n "$browser" ]; then
cat > "$work/check.mjs" <<'JS'
import { chromium } from "playwright-core";
const [url, shot] = process.argv.slice(2);
const names = ["node-a", "node-b", "node-c"];
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
try {
  await page.goto(url);
  await page.waitForFunction((names) => {
    const rows = names.every((n) => document.querySelector(`#nodes tr[data-node="${n}"]`));
    const chart = [...document.querySelectorAll("#dist path.line")].some((p) => Number(p.dataset.points) >= 2);
    const tps = parseFloat(document.getElementById("tokens-out").textContent);
    // Every node's device; each stage's compute and transfer per step (the head's calls), its
    // tensor plane and link latency (the head's probes).
    const cells = [...document.querySelectorAll("#nodes tr[data-node]")].map((r) => [...r.cells].map((c) => c.textContent));
    const devices = cells.length === names.length && cells.every((c) => c[10] && c[10] !== "–");
    const links = cells.filter((c) => c[3] === "stage").every((c) => [8, 9, 12].every((i) => isFinite(parseFloat(c[i]))) && c[11] !== "–");
    return rows && chart && tps > 0 && devices && links;
  }, names, { timeout: 60000, polling: 250 });
  await page.screenshot({ path: shot, fullPage: true });
  const tps = await page.textContent("#tokens-out");
  const series = await page.$$eval("#dist path.line", (ps) => ps.map((p) => `${p.dataset.series} (${p.dataset.points} points)`));
  const links = await page.$$eval("#nodes tr[data-node]", (rs) => rs.map((r) => `${r.cells[0].textContent} on ${r.cells[10].textContent}: compute ${r.cells[8].textContent} ms, transfer ${r.cells[9].textContent} ms per step, link ${r.cells[12].textContent} ms`));
  console.log(`test-observability: the page shows ${links.join("; ")}; ${tps} output tokens/s; latency curves ${series.join(", ")}`);
} catch (e) {
  const text = await page.textContent("body").catch(() => "");
  console.error(`the dashboard never showed every node, a latency chart and a throughput: ${e.message}\n${text}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
JS
    shot=$root/target/dashboard.png
    (cd "$work" && timeout 120 node check.mjs "http://$entry/dashboard" "$shot") || fail "the dashboard at http://$entry/dashboard (bench: $(tail -n 3 "$work/bench.log"))"
    echo "test-observability: screenshot in $shot"
fi
# `baton top` in a terminal (tmux): the nodes and a throughput on screen, and q quits.
if ! apt_install tmux tmux; then
    note "baton top: SKIPPED: no tmux, and no apt-get as root to install it"
else
    session=baton-top-$$
    tmux kill-session -t "$session" 2>/dev/null || true
    tmux new-session -d -s "$session" -x 160 -y 48 "$baton top --url http://$entry"
    deadline=$((SECONDS + 60))
    until screen=$(tmux capture-pane -p -t "$session" 2>/dev/null) && python3 -c '
import re, sys
s = sys.stdin.read()
m = re.search(r"out tok/s ([0-9.]+)", s)
sys.exit(0 if all(n in s for n in ("node-a", "node-b", "node-c")) and m and float(m.group(1)) > 0 else 1)' <<< "$screen"; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "$screen" >&2; tmux kill-session -t "$session" 2>/dev/null; fail "baton top never showed the three nodes and a throughput"; }
        sleep 0.5
    done
    echo "$screen" > "$root/target/baton-top.txt"
    tmux send-keys -t "$session" q
    deadline=$((SECONDS + 10))
    while tmux has-session -t "$session" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { tmux kill-session -t "$session"; fail "baton top did not quit on q"; }
        sleep 0.2
    done
    note "baton top shows the three nodes and $(grep -o 'out tok/s [0-9.]*' "$root/target/baton-top.txt" | head -n1); q quits (screen in target/baton-top.txt)"
fi
# Prometheus, with the configuration Baton writes, and the Grafana dashboard's queries.
if ! apt_install prometheus prometheus; then
    note "prometheus: SKIPPED: no prometheus, and no apt-get as root to install it"
else
    "$baton" cluster prometheus "$work/cluster.toml" --scrape-interval 1 > "$work/prometheus.yml"
    if command -v promtool >/dev/null; then promtool check config "$work/prometheus.yml" >/dev/null || fail "promtool rejects the configuration baton cluster prometheus wrote"; fi
    rm -rf "$work/tsdb"
    prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" --web.listen-address=127.0.14.9:9090 > "$work/prometheus.log" 2>&1 &
    prom=$!
    trap 'kill $prom 2>/dev/null; cleanup' EXIT
    deadline=$((SECONDS + 60))
    until curl -sf http://127.0.14.9:9090/-/ready >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { tail "$work/prometheus.log" >&2; fail "Prometheus not ready in 60 s"; }
        sleep 0.5
    done
    # Every expression of the Grafana dashboard, with Grafana's $__rate_interval as 15s, until
    # each returns a series (rates need a few scrapes), within a deadline.
    python3 - "$root/deploy/grafana/baton.json" <<'PY' || fail "the Grafana dashboard's queries through Prometheus"
import json, sys, time, urllib.parse, urllib.request
dash = json.load(open(sys.argv[1]))
exprs = [(p["title"], t["expr"].replace("$__rate_interval", "15s")) for p in dash["panels"] for t in p.get("targets", [])]
def query(e):
    url = "http://127.0.14.9:9090/api/v1/query?" + urllib.parse.urlencode({"query": e})
    r = json.load(urllib.request.urlopen(url, timeout=5))
    if r["status"] != "success":
        raise SystemExit(f"{e}: {r}")
    return r["data"]["result"]
up = lambda: [s for s in query("up") if s["value"][1] == "1"]
deadline = time.time() + 60
while len(up()) < 3:
    if time.time() > deadline:
        raise SystemExit(f"Prometheus did not reach the three nodes: {query('up')}")
    time.sleep(1)
pending = list(exprs)
deadline = time.time() + 90
while pending:
    pending = [(t, e) for t, e in pending if not query(e)]
    if pending and time.time() > deadline:
        raise SystemExit("no data for: " + "; ".join(f"{t}: {e}" for t, e in pending))
    if pending:
        time.sleep(2)
tps = float(query("sum(rate(baton:generation_tokens_total[15s]))")[0]["value"][1])
if not tps > 0:
    raise SystemExit(f"output tokens/s through Prometheus is {tps}")
print(f"test-observability: Prometheus scrapes the 3 nodes; all {len(exprs)} Grafana queries return data ({tps:.0f} output tokens/s)")
PY
fi
echo "test-observability: passed"
