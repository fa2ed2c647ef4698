#!/usr/bin/env bash
# Start a single-machine SLURM cluster: munge, MariaDB, slurmdbd (accounting),
# slurmctld (controller) and slurmd (the one compute node, with fake GPUs).
#
# Idempotent: daemons already running with an unchanged configuration are left
# alone; a changed slurm.conf/gres.conf restarts slurmctld and slurmd.
# Everything talks over 127.0.0.1 / this host's name; no systemd, no cgroups.
#
# Knobs (environment variables):
#   RLMETA_SLURM_CLUSTER     cluster name                      (default: rlmeta)
#   RLMETA_SLURM_PARTITION   the single, default partition     (default: debug)
#   RLMETA_SLURM_GPUS        fake GPUs on the node (0 = none)  (default: 2)
#   RLMETA_SLURM_DEF_MEM     DefMemPerCPU in MB                (default: 1024)
#   RLMETA_SLURM_WAIT        seconds to wait for the node      (default: 60)
set -euo pipefail

CLUSTER=${RLMETA_SLURM_CLUSTER:-rlmeta}
PARTITION=${RLMETA_SLURM_PARTITION:-debug}
NGPUS=${RLMETA_SLURM_GPUS:-2}
DEF_MEM=${RLMETA_SLURM_DEF_MEM:-1024}
WAIT_S=${RLMETA_SLURM_WAIT:-60}

CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=rlmeta-local-slurmdbd  # MariaDB listens on 127.0.0.1 only

log() { echo "start.sh: $*"; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

[[ $EUID -eq 0 ]] || die "must run as root"
for b in slurmctld slurmd slurmdbd munged mysqld_safe sacctmgr sinfo; do
  command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] \
    || die "$b not found; run scripts/slurm/install.sh first"
done
export PATH=$PATH:/usr/sbin:/sbin

t0=$(date +%s)
NODE=$(hostname -s)
mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"

# ---------------------------------------------------------------- munge
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
if alive /run/munge/munged.pid; then
  log "munged already running (pid $(cat /run/munge/munged.pid))"
else
  runuser -u munge -- /usr/sbin/munged --force
  log "started munged as user munge"
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work"

# ---------------------------------------------------------------- MariaDB
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if mysqladmin --silent ping >/dev/null 2>&1; then
  log "MariaDB already running"
else
  setsid mysqld_safe --bind-address=127.0.0.1 >"$LOG_DIR/mariadb-start.log" 2>&1 < /dev/null &
  for _ in $(seq 150); do mysqladmin --silent ping >/dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin --silent ping >/dev/null 2>&1 || die "MariaDB did not come up (see $LOG_DIR/mariadb-start.log)"
  log "started MariaDB (127.0.0.1)"
fi
mysql -uroot <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---------------------------------------------------------------- configs
# write_if_changed FILE MODE  (content on stdin); prints "changed" when rewritten
write_if_changed() {
  local file=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
    rm -f "$tmp"
  else
    install -m "$mode" -o root -g root "$tmp" "$file"
    rm -f "$tmp"
    echo changed
  fi
}

# slurmdbd.conf: mode 600, owned by SlurmUser (root)
dbd_changed=$(write_if_changed "$CONF_DIR/slurmdbd.conf" 600 <<EOF
# Written by rlmeta scripts/slurm/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
)

# node geometry from slurmd -C
hw=$(slurmd -C | head -n1)
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
SOCKETS=$(field SocketsPerBoard); BOARDS=$(field Boards)
CORES=$(field CoresPerSocket); THREADS=$(field ThreadsPerCore)
MEM=$(field RealMemory)
[[ -n $SOCKETS && -n $CORES && -n $THREADS && -n $MEM ]] || die "cannot parse 'slurmd -C': $hw"
SOCKETS=$(( SOCKETS * ${BOARDS:-1} ))
MEM=$(( MEM * 95 / 100 ))  # headroom: slurmd drains a node whose RealMemory exceeds what it sees

# fake GPUs: character devices (major 1 minor 3, like /dev/null)
gres_line=""
gres_conf="# Written by rlmeta scripts/slurm/start.sh"$'\n'
if (( NGPUS > 0 )); then
  for (( i = 0; i < NGPUS; i++ )); do
    dev=/dev/fakegpu$i
    if [[ ! -c $dev ]]; then rm -f "$dev"; mknod "$dev" c 1 3; chmod 666 "$dev"; fi
  done
  gres_line=" Gres=gpu:$NGPUS"
  gres_conf+="NodeName=$NODE Name=gpu File=/dev/fakegpu[0-$(( NGPUS - 1 ))]"$'\n'
fi
gres_changed=$(printf '%s' "$gres_conf" | write_if_changed "$CONF_DIR/gres.conf" 644)

conf_changed=$(write_if_changed "$CONF_DIR/slurm.conf" 644 <<EOF
# Written by rlmeta scripts/slurm/start.sh: one machine is controller and node.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# accounting through slurmdbd (sacct works; the snakemake plugin's default status command)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment,job_script
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
log "node $NODE: sockets=$SOCKETS cores/socket=$CORES threads/core=$THREADS RealMemory=${MEM}MB gpus=$NGPUS DefMemPerCPU=${DEF_MEM}MB partition=$PARTITION"

# ---------------------------------------------------------------- slurmdbd
if [[ -n $dbd_changed ]] && alive "$RUN_DIR/slurmdbd.pid"; then
  log "slurmdbd.conf changed: restarting slurmdbd"
  kill "$(cat "$RUN_DIR/slurmdbd.pid")"
  for _ in $(seq 50); do alive "$RUN_DIR/slurmdbd.pid" || break; sleep 0.2; done
fi
if alive "$RUN_DIR/slurmdbd.pid"; then
  log "slurmdbd already running (pid $(cat "$RUN_DIR/slurmdbd.pid"))"
else
  slurmdbd
  log "started slurmdbd"
fi
for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd does not answer (see $LOG_DIR/slurmdbd.log)"
if sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  log "cluster '$CLUSTER' already in accounting"
else
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  log "added cluster '$CLUSTER' to accounting"
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if [[ -n $conf_changed || -n $gres_changed ]]; then
  for d in slurmd slurmctld; do
    if alive "$RUN_DIR/$d.pid"; then
      log "configuration changed: stopping $d"
      kill "$(cat "$RUN_DIR/$d.pid")"
      for _ in $(seq 50); do alive "$RUN_DIR/$d.pid" || break; sleep 0.2; done
    fi
  done
fi
if alive "$RUN_DIR/slurmctld.pid"; then
  log "slurmctld already running (pid $(cat "$RUN_DIR/slurmctld.pid"))"
else
  slurmctld
  log "started slurmctld"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if alive "$RUN_DIR/slurmd.pid"; then
  log "slurmd already running (pid $(cat "$RUN_DIR/slurmd.pid"))"
else
  slurmd
  log "started slurmd"
fi

# ---------------------------------------------------------------- wait for idle
state=""
deadline=$(( $(date +%s) + WAIT_S ))
while (( $(date +%s) < deadline )); do
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 || true)
  case $state in
    idle|mix|alloc) break ;;
    drain*|down*|drng)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case $state in
  idle|mix|alloc) ;;
  *) sinfo -N -l >&2 || true
     die "node $NODE not ready after ${WAIT_S}s (state '$state'; see $LOG_DIR/slurmctld.log, $LOG_DIR/slurmd.log)" ;;
esac
log "node $NODE is $state after $(( $(date +%s) - t0 )) s"
sinfo -o "%P %a %D %t %N %c %m %G"
