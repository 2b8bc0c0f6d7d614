#!/usr/bin/env bash
# Stop the single-node Slurm of .ci/slurm/start.sh (its daemons, by PID file or name).
set -uo pipefail
for pid in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/slurm/slurmdbd.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
done
sleep 1
pkill -x slurmd; pkill -x slurmctld; pkill -x slurmdbd; pkill -x mariadbd; pkill -x munged
exit 0
