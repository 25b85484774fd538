#!/bin/sh
# Starts this pod's Baton node (the container's command), or with `drain` (the preStop hook)
# asks it to leave gracefully. baton-0 is cluster.toml's node, the seed; every other pod joins
# through it on its pod IP, in replica ORDINAL / BATON_NODES_PER_REPLICA: with 1 (the default)
# each pod heads a pipeline of its own (it needs memory for the whole model); with N, the first
# pod of each group of N heads it and the others take layers from it.
set -eu
cfg=${BATON_CONFIG:-/etc/baton/config/cluster.toml}
name=${POD_NAME:?POD_NAME is not set (the downward API sets it)}
ordinal=${name##*-}
per=${BATON_NODES_PER_REPLICA:-1}
replica=$((ordinal / per))
if grep -q "^name = \"$name\"" "$cfg"; then
    own=""
else
    own="--control ${POD_IP:?POD_IP is not set}:7100 --http $POD_IP:8080 --memory-gb ${BATON_MEMORY_GB:-4} --replica $replica"
fi
if [ "${1:-run}" = drain ]; then
    # A stage: the head moves its layers away while they still serve, then releases the node,
    # which exits (and the container with it). A pipeline head cannot be drained: this returns
    # and SIGTERM follows (it stops taking requests, finishes those running, leaves the mesh).
    # shellcheck disable=SC2086
    baton node --cluster "$cfg" --name "$name" $own --drain || exit 0
    # The node is the container's process 1 (this script exec'd it).
    while kill -0 "${BATON_NODE_PID:-1}" 2>/dev/null; do sleep 1; done
    exit 0
fi
# shellcheck disable=SC2086
exec baton node --cluster "$cfg" --name "$name" $own ${BATON_NODE_ARGS:-}
