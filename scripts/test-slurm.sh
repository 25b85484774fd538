#!/usr/bin/env bash
# The Slurm test, for real: a one-machine Slurm (munged, slurmctld and slurmd on localhost, on
# ports of their own, config and state under target/slurm-test), deploy/slurm/baton.sbatch
# submitted with three tasks, OpenAI requests to the endpoint it printed checked against one
# node's answers (`baton generate`, greedy), then `scancel` and a check that every node stopped.
# Installs Debian's slurm-wlm and munge if missing; skipped, saying why, where it cannot run
# (not root, no apt-get). Every wait has a deadline; everything it started is stopped on exit.
#   scripts/test-slurm.sh            (uses target/release/baton; BATON=... for another)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
baton=${BATON:-$root/target/release/baton}
skip() { echo "test-slurm: SKIPPED: $*"; exit 0; }
fail() { echo "test-slurm: FAILED: $*" >&2; exit 1; }
[ -x "$baton" ] || fail "no baton binary at $baton (cargo build --release -p baton)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || skip "slurm-wlm and munge are not installed and this is not root"
    command -v apt-get >/dev/null || skip "slurm-wlm and munge are not installed and there is no apt-get"
    echo "test-slurm: installing slurm-wlm and munge"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge) >/dev/null \
        || skip "apt-get could not install slurm-wlm and munge"
fi
[ "$(id -u)" = 0 ] || skip "a local Slurm needs root (slurmd runs jobs as their users)"

work=$root/target/slurm-test
rm -rf "$work"
mkdir -p "$work/state" "$work/spool" "$work/log" "$work/submit"
conf=$work/slurm.conf
export SLURM_CONF=$conf
cat > "$conf" <<CONF
ClusterName=baton-test
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

started_munge=0
job=""
cleanup() {
    set +e
    [ -n "$job" ] && scancel "$job" 2>/dev/null
    # The nodes stop on scancel; any left after 30 s are killed.
    for _ in $(seq 1 60); do pgrep -f "node --cluster $work/" >/dev/null || break; sleep 0.5; done
    pkill -9 -f "node --cluster $work/" 2>/dev/null
    for d in slurmd slurmctld; do
        [ -f "$work/$d.pid" ] && kill "$(cat "$work/$d.pid")" 2>/dev/null
    done
    [ "$started_munge" = 1 ] && [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
}
trap cleanup EXIT

# munged: reuse a running one, else start it as its user.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
    started_munge=1
    for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || fail "munge does not answer"
fi
/usr/sbin/slurmctld -f "$conf" || fail "slurmctld did not start (see $work/log/slurmctld.log)"
/usr/sbin/slurmd -f "$conf" -N localhost || fail "slurmd did not start (see $work/log/slurmd.log)"
deadline=$((SECONDS + 60))
until sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$work/log/"*.log >&2; fail "the Slurm node did not become idle in 60 s"; }
    sleep 0.5
done
echo "test-slurm: Slurm is up ($(sinfo -h -o '%P %D %T'))"

# The job: three tasks on this machine's CPUs (--overcommit: three tasks on two CPUs), the tiny
# demo model, ports of their own.
job_dir=$work/submit/baton-job
export BATON=$baton BATON_MODEL=demo:tiny BATON_JOB_DIR=$job_dir BATON_CONTROL_PORT=17100 BATON_HTTP_PORT=18080 BATON_QUIC_PORT=18081 BATON_NODE_ARGS="--threads 1 --kv-cache-mb 64" BATON_START_TIMEOUT=240
job=$(cd "$work/submit" && sbatch --parsable --ntasks=3 --overcommit --output="$work/submit/job.out" "$root/deploy/slurm/baton.sbatch")
echo "test-slurm: submitted job $job"
deadline=$((SECONDS + 300))
until [ -s "$job_dir/endpoint" ]; do
    state=$(scontrol show job "$job" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p')
    case $state in PENDING|RUNNING|CONFIGURING|"") ;; *) cat "$work/submit/job.out" >&2; fail "job $job ended ($state) before printing an endpoint"; esac
    [ "$SECONDS" -lt "$deadline" ] || { cat "$work/submit/job.out" >&2; tail -n 20 "$job_dir"/node-*.log >&2; fail "no endpoint after 300 s (job state $state)"; }
    sleep 1
done
endpoint=$(cat "$job_dir/endpoint")
grep -q "the mesh is ready: OpenAI API at $endpoint" "$work/submit/job.out" || fail "the job's output does not print the endpoint $endpoint"
echo "test-slurm: the job printed $endpoint"
[ "$(grep -c '^\[\[nodes\]\]' "$job_dir/cluster.toml")" = 3 ] || fail "the job's cluster.toml does not name three nodes"

# Answers through the mesh against one node's own (greedy, the same model).
model_name=$(curl -sf "$endpoint/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])') || fail "GET $endpoint/models"
for prompt in "Hello" "The mesh over Slurm" "Once upon a time"; do
    want=$("$baton" generate --preset tiny --prompt "$prompt" --max-tokens 12 --temperature 0 --json | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["text"]))')
    body=$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2], "max_tokens": 12, "temperature": 0}))' "$model_name" "$prompt")
    got=$(curl -sf -m 60 "$endpoint/completions" -H 'content-type: application/json' -d "$body" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))') || fail "POST $endpoint/completions"
    [ "$got" = "$want" ] || fail "prompt \"$prompt\": the mesh answered $got, one node $want"
    echo "test-slurm: \"$prompt\" -> $got (as one node)"
done

# scancel stops every node and the job, cleanly.
scancel "$job"
deadline=$((SECONDS + 60))
while scontrol show job "$job" -o 2>/dev/null | grep -qE 'JobState=(RUNNING|PENDING|COMPLETING|CONFIGURING)' || pgrep -f "node --cluster $job_dir/" >/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || fail "job $job or its nodes still running 60 s after scancel"
    sleep 0.5
done
[ ! -e "$job_dir/endpoint" ] || fail "the endpoint file outlived the job"
grep -q "stopping the nodes" "$work/submit/job.out" || fail "the job's output does not show a clean stop"
job=""
echo "test-slurm: scancel stopped the job and its three nodes"
echo "test-slurm: passed"
