#!/usr/bin/env bash
# Start a single-machine SLURM cluster: munge, MariaDB, slurmdbd (accounting),
# slurmctld (controller) and slurmd (compute node(s) with fake GPUs).
#
# Idempotent: daemons already running with an unchanged configuration are left
# alone; a changed slurm.conf/gres.conf restarts slurmctld and the slurmd(s).
# Everything talks over this host's address (127.0.0.1 here) and 127.0.0.x for
# extra nodes; no systemd, no cgroups.
#
# Knobs (environment variables):
#   RLMETA_SLURM_CLUSTER     cluster name                      (default: rlmeta)
#   RLMETA_SLURM_PARTITION   the single, default partition     (default: debug)
#   RLMETA_SLURM_NODES       compute nodes                     (default: 1)
#                            N > 1: nodes <host>-2 .. <host>-N are more slurmd
#                            daemons on this machine (address 127.0.0.k, port
#                            6818 + 10 (k-1), own hostname through `unshare -u`,
#                            /etc/hosts entries); all nodes share this machine's
#                            CPUs and memory.
#   RLMETA_SLURM_GPUS        fake GPUs per node (0 = none)     (default: 2)
#   RLMETA_SLURM_DEF_MEM     DefMemPerCPU in MB                (default: 1024)
#   RLMETA_SLURM_WAIT        seconds to wait for the nodes     (default: 60)
set -euo pipefail

CLUSTER=${RLMETA_SLURM_CLUSTER:-rlmeta}
PARTITION=${RLMETA_SLURM_PARTITION:-debug}
NNODES=${RLMETA_SLURM_NODES:-1}
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
# running PID: exists and is not a zombie
running() { kill -0 "$1" 2>/dev/null && ! grep -q "^State:[[:space:]]*Z" "/proc/$1/status" 2>/dev/null; }
alive() { [[ -f $1 ]] && running "$(cat "$1" 2>/dev/null)"; }
stop_pid() {  # PIDFILE: TERM, wait up to 10 s, KILL
  local pid
  alive "$1" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do running "$pid" || break; sleep 0.2; done
  running "$pid" && kill -9 "$pid" 2>/dev/null
  rm -f "$1"
}

[[ $EUID -eq 0 ]] || die "must run as root"
export PATH=$PATH:/usr/sbin:/sbin
for b in slurmctld slurmd slurmdbd munged mysqld_safe sacctmgr sinfo; do
  command -v "$b" >/dev/null 2>&1 || die "$b not found; run scripts/slurm/install.sh first"
done
[[ $NNODES =~ ^[0-9]+$ ]] && (( NNODES >= 1 && NNODES <= 16 )) || die "RLMETA_SLURM_NODES must be 1..16"
[[ $NGPUS =~ ^[0-9]+$ ]] || die "RLMETA_SLURM_GPUS must be a number"

t0=$(date +%s)
NODE=$(hostname -s)
NODE_ADDR=$(getent ahostsv4 "$NODE" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
NODE_ADDR=${NODE_ADDR:-127.0.0.1}
NODES=("$NODE")
for (( i = 2; i <= NNODES; i++ )); do NODES+=("$NODE-$i"); done
node_addr() { if (( $1 == 0 )); then echo "$NODE_ADDR"; else echo "127.0.0.$(( $1 + 1 ))"; fi; }
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
# 5 % headroom (slurmd drains a node that claims more than it sees), split over the nodes
MEM=$(( MEM * 95 / 100 / NNODES ))

# extra nodes: their names resolve to their own loopback address
for (( k = 1; k < NNODES; k++ )); do
  name=${NODES[$k]} addr=$(node_addr "$k")
  if [[ $(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 {print $1}') != "$addr" ]]; then
    sed -i "/ $name # rlmeta-slurm\$/d" /etc/hosts
    echo "$addr $name # rlmeta-slurm" >> /etc/hosts
    log "added '$addr $name' to /etc/hosts"
  fi
done

# fake GPUs: character devices (major 1 minor 3, like /dev/null), NGPUS per node
gres_line=""
gres_conf="# Written by rlmeta scripts/slurm/start.sh"$'\n'
if (( NGPUS > 0 )); then
  for (( i = 0; i < NGPUS * NNODES; i++ )); do
    dev=/dev/fakegpu$i
    if [[ ! -c $dev ]]; then rm -f "$dev"; mknod "$dev" c 1 3; chmod 666 "$dev"; fi
  done
  gres_line=" Gres=gpu:$NGPUS"
  for (( k = 0; k < NNODES; k++ )); do
    first=$(( k * NGPUS )); last=$(( first + NGPUS - 1 ))
    if (( first == last )); then files=/dev/fakegpu$first; else files="/dev/fakegpu[$first-$last]"; fi
    gres_conf+="NodeName=${NODES[$k]} Name=gpu File=$files"$'\n'
  done
fi
gres_changed=$(printf '%s' "$gres_conf" | write_if_changed "$CONF_DIR/gres.conf" 644)

# several slurmd on one machine: each listens on its own port (6818, 6828, ...);
# (CommunicationParameters=NoInAddrAny would also bind srun to the hostname's
# address, and then a job step started from a batch script on node 2 cannot connect)
node_lines=""
for (( k = 0; k < NNODES; k++ )); do
  port=""
  (( NNODES > 1 )) && port=" Port=$(( 6818 + 10 * k ))"
  node_lines+="NodeName=${NODES[$k]} NodeAddr=$(node_addr "$k") NodeHostname=${NODES[$k]}$port"
  node_lines+=" Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM$gres_line State=UNKNOWN"$'\n'
done
all_nodes=$(IFS=,; echo "${NODES[*]}")

conf_changed=$(write_if_changed "$CONF_DIR/slurm.conf" 644 <<EOF
# Written by rlmeta scripts/slurm/start.sh: one machine is controller and node(s).
ClusterName=$CLUSTER
SlurmctldHost=$NODE($NODE_ADDR)
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
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# accounting through slurmdbd: sacct works (the snakemake plugin's default status command)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment,job_script
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
${node_lines}PartitionName=$PARTITION Nodes=$all_nodes Default=YES MaxTime=INFINITE State=UP
EOF
)
log "nodes ${NODES[*]}: sockets=$SOCKETS cores/socket=$CORES threads/core=$THREADS RealMemory=${MEM}MB gpus=$NGPUS each; DefMemPerCPU=${DEF_MEM}MB; partition $PARTITION"

# ---------------------------------------------------------------- slurmdbd
if [[ -n $dbd_changed ]] && alive "$RUN_DIR/slurmdbd.pid"; then
  log "slurmdbd.conf changed: restarting slurmdbd"
  stop_pid "$RUN_DIR/slurmdbd.pid"
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
  for pidfile in "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"; do
    if alive "$pidfile"; then
      log "configuration changed: stopping $(basename "$pidfile" .pid)"
      stop_pid "$pidfile"
    fi
  done
fi
# pid files of nodes that are no longer configured
for pidfile in "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmd.pid"; do
  [[ -e $pidfile ]] || continue
  name=$(basename "$pidfile" .pid); name=${name#slurmd-}
  if [[ " ${NODES[*]} " != *" $name "* ]]; then log "stopping slurmd of removed node $name"; stop_pid "$pidfile"; fi
done
if alive "$RUN_DIR/slurmctld.pid"; then
  log "slurmctld already running (pid $(cat "$RUN_DIR/slurmctld.pid"))"
else
  slurmctld
  log "started slurmctld"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
for (( k = 0; k < NNODES; k++ )); do
  name=${NODES[$k]}
  mkdir -p "$SPOOL_DIR/$name"
  if alive "$RUN_DIR/slurmd-$name.pid"; then
    log "slurmd $name already running (pid $(cat "$RUN_DIR/slurmd-$name.pid"))"
  elif (( k == 0 )); then
    slurmd -N "$name"
    log "started slurmd $name"
  else
    # own UTS namespace so that the node (and its jobs) see hostname $name
    unshare -u sh -c "hostname '$name' && exec slurmd -N '$name'" \
      || die "cannot start slurmd $name in its own UTS namespace (unshare -u); use RLMETA_SLURM_NODES=1"
    log "started slurmd $name (127.0.0.$(( k + 1 )), hostname $name)"
  fi
done

# ---------------------------------------------------------------- wait for idle
deadline=$(( $(date +%s) + WAIT_S ))
ready=0
while (( $(date +%s) < deadline )); do
  ready=0
  for name in "${NODES[@]}"; do
    state=$(sinfo -h -n "$name" -o %t 2>/dev/null | head -n1 || true)
    case $state in
      idle|mix|alloc) ready=$(( ready + 1 )) ;;
      drain*|down*|drng|inval)
        scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true ;;
    esac
  done
  (( ready == NNODES )) && break
  sleep 0.5
done
if (( ready != NNODES )); then
  sinfo -N -l >&2 || true
  die "only $ready of $NNODES node(s) ready after ${WAIT_S}s (see $LOG_DIR/slurmctld.log, $LOG_DIR/slurmd-*.log)"
fi
log "$NNODES node(s) idle after $(( $(date +%s) - t0 )) s"
sinfo -N -o "%P %a %t %N %c %m %G"
