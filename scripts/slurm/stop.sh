#!/usr/bin/env bash
# Stop the single-machine SLURM cluster started by start.sh (by pid file only).
# Running jobs are killed with the nodes.  Safe to run when nothing is running.
# RLMETA_SLURM_CLEAN=1 also removes the /etc/hosts entries and /dev/fakegpu*
# devices that start.sh made (configs, state and the accounting DB are kept).
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin
RUN_DIR=/run/slurm

log() { echo "stop.sh: $*"; }
# running PID: exists and is not a zombie
running() { kill -0 "$1" 2>/dev/null && ! grep -q "^State:[[:space:]]*Z" "/proc/$1/status" 2>/dev/null; }
alive() { [[ -f $1 ]] && running "$(cat "$1" 2>/dev/null)"; }

stop_pidfile() {  # NAME PIDFILE
  local name=$1 pidfile=$2 pid
  if ! alive "$pidfile"; then
    log "$name not running"
    rm -f "$pidfile"
    return 0
  fi
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do running "$pid" || break; sleep 0.2; done
  if running "$pid"; then
    kill -9 "$pid" 2>/dev/null
    log "$name (pid $pid) killed"
  else
    log "$name (pid $pid) stopped"
  fi
  rm -f "$pidfile"
}

found=0
for pidfile in "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmd.pid"; do
  [[ -e $pidfile ]] || continue
  found=1
  stop_pidfile "$(basename "$pidfile" .pid)" "$pidfile"
done
(( found )) || log "slurmd not running"
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"

if command -v mysqladmin >/dev/null 2>&1 && mysqladmin --silent ping >/dev/null 2>&1; then
  mysqladmin shutdown && log "MariaDB stopped"
else
  log "MariaDB not running"
fi

stop_pidfile munged /run/munge/munged.pid

if [[ -n ${RLMETA_SLURM_CLEAN:-} ]]; then
  sed -i '/ # rlmeta-slurm$/d' /etc/hosts
  rm -f /dev/fakegpu[0-9]*
  log "removed rlmeta-slurm /etc/hosts entries and /dev/fakegpu* devices"
fi
