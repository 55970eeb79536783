#!/bin/bash
# Stop the one-node cluster of up.sh: cancel every job left (slurmd does not kill running job
# steps when it stops, and a queued job would start again with the next up.sh), then each
# daemon by its PID file, in the reverse order of up.sh.
#   bash slurm/local-cluster/down.sh
if command -v squeue >/dev/null && timeout 10 sinfo -h >/dev/null 2>&1; then
    scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
fi
for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mariadbd-slurm-local.pid /run/munge/munged.pid; do
    pid=$(cat "$f" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null && echo "stopped $pid ($f)"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
done
