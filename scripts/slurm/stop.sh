#!/usr/bin/env bash
# Stop the single-machine SLURM cluster started by start.sh (by pid file only).
# Running jobs are killed with the node.  Safe to run when nothing is running.
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin
RUN_DIR=/run/slurm

log() { echo "stop.sh: $*"; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

stop_pidfile() {  # NAME PIDFILE
  local name=$1 pidfile=$2 pid
  if ! alive "$pidfile"; then
    log "$name not running"
    rm -f "$pidfile"
    return 0
  fi
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null
    log "$name (pid $pid) killed"
  else
    log "$name (pid $pid) stopped"
  fi
  rm -f "$pidfile"
}

stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"

if command -v mysqladmin >/dev/null 2>&1 && mysqladmin --silent ping >/dev/null 2>&1; then
  mysqladmin shutdown && log "MariaDB stopped"
else
  log "MariaDB not running"
fi

stop_pidfile munged /run/munge/munged.pid
