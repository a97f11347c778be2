#!/usr/bin/env bash
# hpc_gan's SLURM test cluster: a real Slurm (Debian's packages) on this one Debian machine.
#
#   bash tests/slurm/cluster.sh start            install if needed, configure, start, wait for idle nodes
#   bash tests/slurm/cluster.sh stop [--purge]   cancel jobs, stop what `start` started, undo /etc/hosts;
#                                                --purge also deletes state, logs, DB and the configs
#   bash tests/slurm/cluster.sh status           what is running; exit 0 only if the cluster is usable
#
# What runs: munged, MariaDB (127.0.0.1 only, private datadir), slurmdbd (so `sacct` reports real job
# states, which submitit reads), slurmctld, and N slurmd "nodes" node1..nodeN. Each slurmd lives in its
# own UTS namespace, so `hostname` inside a job prints its node name and a 4-node job sees 4 hosts.
# All traffic stays on 127.0.0.1. Needs root (the daemons and jobs run as root).
#
# `start` is idempotent: it starts only what is not running and waits until every node responds.
# A daemon counts as ours only if its pid is in $DIR/pids and /proc/<pid>/comm names that daemon;
# `stop` signals nothing else (a munged this script did not start is used and left alone).
# `start` refuses (exit 3) to overwrite an /etc/slurm/slurm.conf that it did not write.
#
# Knobs (environment):
#   HPC_GAN_SLURM_NODES=4          number of nodes (node1..nodeN)
#   HPC_GAN_SLURM_CPUS=4           CPUs each node advertises (oversubscribes the real cores: fine for tests)
#   HPC_GAN_SLURM_GPUS=0           >0: each node advertises that many fake GPUs (gres/gpu backed by
#                                  copies of /dev/null) so `--gpus-per-node` jobs get scheduled
#   HPC_GAN_SLURM_PARTITION=debug  name of the one (default) partition
#   HPC_GAN_SLURM_DIR=/var/tmp/hpc_gan-slurm   state, logs, pid files, MariaDB data, test workdirs
#   HPC_GAN_SLURM_TIMEOUT=120      seconds to wait for each daemon and for the nodes (generous: the
#                                  2-core CI machine is shared; every wait is bounded by this)
set -euo pipefail

NODES=${HPC_GAN_SLURM_NODES:-4}
CPUS=${HPC_GAN_SLURM_CPUS:-4}
GPUS=${HPC_GAN_SLURM_GPUS:-0}
PARTITION=${HPC_GAN_SLURM_PARTITION:-debug}
DIR=${HPC_GAN_SLURM_DIR:-/var/tmp/hpc_gan-slurm}
TIMEOUT=${HPC_GAN_SLURM_TIMEOUT:-120}

CLUSTER=hpcgan
PREFIX=node
CTLD_PORT=6817
DBD_PORT=6819
DB_PORT=16819            # MariaDB, bound to 127.0.0.1 only
NODE_BASE_PORT=17000     # the slurmd of node i listens on NODE_BASE_PORT + i
DB_PASS=hpc-gan-test     # a throw-away accounting DB reachable from 127.0.0.1 only
ETC=/etc/slurm
CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
GRES_CONF=$ETC/gres.conf
MARK="# written by hpc_gan tests/slurm/cluster.sh"   # first line of every config we write
HOSTS_TAG="# hpc_gan-slurm"                          # ends the line we add to /etc/hosts
PACKAGES="munge slurm-client slurmctld slurmd slurmdbd mariadb-server"

T0=$(date +%s%N)
elapsed() { local ms=$((($(date +%s%N) - T0) / 1000000)); printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100)); }
log() { printf '[hpc_gan-slurm %s] %s\n' "$(date +%T)" "$*"; }
die() { log "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ our processes
is_alive() { # is_alive PID -- a zombie counts as gone
  [ -r "/proc/$1/stat" ] && [ "$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}
is_running() { # is_running PID COMM
  is_alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
ours() { # ours NAME COMM -- the daemon recorded in $DIR/pids/NAME.pid is alive and still is COMM
  local f="$DIR/pids/$1.pid"
  [ -s "$f" ] && is_running "$(cat "$f")" "$2"
}
launch() { # launch NAME CMD... -- start a daemon in the background in its own session, record its pid
  # The pid goes to $DIR/pids at once, so that `stop` finds the daemon even if this script fails
  # while waiting for it. setsid (and unshare, sh) exec, so $! is the daemon itself.
  local name=$1; shift
  setsid "$@" </dev/null >"$DIR/log/$name.out" 2>&1 &
  echo $! > "$DIR/pids/$name.pid"
}
wait_for() { # wait_for WHAT CMD... -- poll CMD until it succeeds, at most $TIMEOUT s
  local what=$1 end=$(($(date +%s) + TIMEOUT)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out after ${TIMEOUT}s waiting for $what (logs: $DIR/log)"
    sleep 0.2
  done
}
stop_daemon() { # stop_daemon NAME COMM -- SIGTERM, up to 10 s, then SIGKILL; only if ours
  local f="$DIR/pids/$1.pid" p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if is_running "$p" "$2"; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do is_running "$p" "$2" || break; sleep 0.1; done
    if is_running "$p" "$2"; then log "$1 (pid $p) ignored SIGTERM: SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
    log "stopped $1 (pid $p)"
  fi
  rm -f "$f"
}
slurmstepds() { # pids of live slurmstepd processes (the per-job helpers of slurmd)
  local p c
  for p in /proc/[0-9]*; do
    c=""; { read -r c < "$p/comm"; } 2>/dev/null || continue
    [ "$c" = slurmstepd ] && is_running "${p#/proc/}" slurmstepd && echo "${p#/proc/}"
  done
  return 0
}

# ------------------------------------------------------------------ start, step by step
install_packages() {
  local missing="" p policy=""
  for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  log "installing:$missing"
  # The packages' maintainer scripts would start the daemons with Debian's default configs;
  # policy-rc.d exit 101 forbids that for the duration of the install.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
  log "installed ($(elapsed))"
}

written_by_us() { case "$(head -n1 "$1")" in "$MARK"*) return 0 ;; *) return 1 ;; esac; }
refuse_foreign_config() {
  local f
  for f in "$CONF" "$DBD_CONF"; do
    if [ -s "$f" ] && ! written_by_us "$f"; then
      log "ERROR: $f was not written by this script (another SLURM installation?); refusing to replace it."
      log "Move it away, or run the tests on a machine without a SLURM of its own."
      exit 3
    fi
  done
}

slurm_conf() { # the whole slurm.conf on stdout
  local host nodelist ports gres=""
  host=$(hostname -s)
  nodelist="$PREFIX[1-$NODES]"; ports="$((NODE_BASE_PORT + 1))-$((NODE_BASE_PORT + NODES))"
  [ "$NODES" = 1 ] && { nodelist="${PREFIX}1"; ports=$((NODE_BASE_PORT + 1)); }
  [ "$GPUS" -gt 0 ] && gres=" Gres=gpu:$GPUS"
  cat <<EOF
$MARK -- a single-host test cluster, not for production
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Also the time a requeued job is held before it may start again (default 120 s); submitit's
# checkpoint -> requeue round trip waits this long.
AuthInfo=cred_expire=10
# Jobs may be requeued (submitit's preemption/timeout handling runs 'scontrol requeue').
JobRequeue=1
MpiDefault=none
# No cgroups: works in containers and VMs without a delegated cgroup tree. linuxproc still tracks
# every process of a step, so scancel --signal and sbatch --signal reach the job's processes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule a batch job when it is submitted (the default batch_sched_delay=3 adds up to 3 s a job).
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
# Nodes advertise the CPUs and memory written here, not the hardware's (they share one host).
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
# SIGTERM -> SIGKILL grace at the end of a job; submitit ignores the first SIGTERM.
KillWait=5
# slurmd binds to the address its node name resolves to (127.0.0.1 via /etc/hosts), not 0.0.0.0.
CommunicationParameters=NoInAddrAny
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/pids/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
EOF
  [ "$GPUS" -gt 0 ] && echo "GresTypes=gpu"
  cat <<EOF
# N slurmd on one host: one NodeHostname, one port each (Debian's slurmd takes -N <node name>).
NodeName=$nodelist NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports CPUs=$CPUS RealMemory=$(mem_mb)$gres State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}
mem_mb() { awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo; }

gres_conf() { # gres.conf on stdout: fake GPUs are character devices equal to /dev/null
  echo "$MARK"
  [ "$GPUS" -gt 0 ] || return 0
  local files="$DIR/dev/gpu[0-$((GPUS - 1))]"
  [ "$GPUS" = 1 ] && files="$DIR/dev/gpu0"
  echo "NodeName=$PREFIX[1-$NODES] Name=gpu File=$files"
}

slurmdbd_conf() {
  cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=$(hostname -s)
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/pids/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

slurm_running() { # is slurmctld or any slurmd of ours alive?
  local f
  ours slurmctld slurmctld && return 0
  for f in "$DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && ours "$(basename "$f" .pid)" slurmd && return 0; done
  return 1
}
stop_slurm() { # slurmd x N, then slurmctld (after cancelling jobs so no job outlives its slurmd)
  local f jobs
  if ours slurmctld slurmctld; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  # a cancelled step may still be in its KillWait (5 s) window
  for _ in $(seq 1 75); do [ -z "$(slurmstepds)" ] && break; sleep 0.2; done
  for f in "$DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && stop_daemon "$(basename "$f" .pid)" slurmd; done
  stop_daemon slurmctld slurmctld
}

write_configs() {
  local new_conf new_gres k
  mkdir -p "$DIR"/{pids,log,ctld,spool,work} "$ETC"
  if [ "$GPUS" -gt 0 ]; then
    mkdir -p "$DIR/dev"
    for k in $(seq 0 $((GPUS - 1))); do [ -c "$DIR/dev/gpu$k" ] || mknod "$DIR/dev/gpu$k" c 1 3; done
  fi
  new_conf=$(slurm_conf); new_gres=$(gres_conf)
  # A running cluster with another config (other knobs): restart slurmctld and the nodes with the new one.
  if slurm_running &&
    { [ "$new_conf" != "$(cat "$CONF" 2>/dev/null)" ] || [ "$new_gres" != "$(cat "$GRES_CONF" 2>/dev/null)" ]; }; then
    log "configuration changed: restarting slurmctld and the nodes (running jobs are cancelled)"
    stop_slurm
  fi
  printf '%s\n' "$new_conf" > "$CONF"; chmod 644 "$CONF"
  printf '%s\n' "$new_gres" > "$GRES_CONF"; chmod 644 "$GRES_CONF"
  (umask 077; slurmdbd_conf > "$DBD_CONF")   # holds the DB password; slurmdbd insists on 600
}

add_hosts_line() { # node1..nodeN -> 127.0.0.1, needed by srun/slurmd inside the nodes' UTS namespaces
  local line hosts
  line="127.0.0.1 $(seq -f "$PREFIX%g" 1 "$NODES" | paste -sd' ') $HOSTS_TAG"
  grep -qxF "$line" /etc/hosts && return 0
  # rewrite in place, keeping the inode: /etc/hosts is often a bind mount in containers
  hosts=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
  printf '%s\n%s\n' "$hosts" "$line" > /etc/hosts
}
remove_hosts_line() {
  local hosts
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  hosts=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
  printf '%s\n' "$hosts" > /etc/hosts
}

start_munge() {
  if ! ours munged munged; then
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      log "munged already running, not started by this script: using it, stop will leave it alone"
    else
      if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
      fi
      install -d -o munge -g munge -m 0755 /run/munge
      # setpriv execs (runuser would stay as munged's parent): the recorded pid is munged's
      launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
      wait_for munged sh -c 'munge -n | unmunge'
      log "munged started (pid $(cat "$DIR/pids/munged.pid"))"
    fi
  fi
  wait_for munge sh -c 'munge -n | unmunge'
}

start_mariadb() { # a private server: own datadir, socket and port; nothing on the host's default MySQL
  local my="$DIR/mysql" sock="$DIR/mysql/mysqld.sock"
  ours mariadb mariadbd && return 0
  install -d -o mysql -g mysql -m 0750 "$my"
  if [ ! -d "$my/data/mysql" ]; then
    install -d -o mysql -g mysql -m 0750 "$my/data"
    mariadb-install-db --no-defaults --user=mysql --datadir="$my/data" --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed, see $DIR/log/mariadb-install.log"
  fi
  launch mariadb /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$my/data" --socket="$sock" \
    --pid-file="$my/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
    --bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900
  wait_for MariaDB mariadb --no-defaults --socket="$sock" -e 'select 1'
  mariadb --no-defaults --socket="$sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  log "MariaDB started (pid $(cat "$DIR/pids/mariadb.pid"), $(elapsed))"
}

start_slurmdbd() {
  ours slurmdbd slurmdbd && return 0
  launch slurmdbd slurmdbd -D
  wait_for slurmdbd sacctmgr -n -P show cluster
  log "slurmdbd started (pid $(cat "$DIR/pids/slurmdbd.pid"), $(elapsed))"
}

start_slurmctld() {
  ours slurmctld slurmctld && return 0
  # -i: ignore state files slurmctld cannot use (e.g. saved under another node list)
  launch slurmctld slurmctld -D -i
  wait_for slurmctld sh -c 'scontrol ping | grep -q "is UP"'
  log "slurmctld started (pid $(cat "$DIR/pids/slurmctld.pid"), $(elapsed))"
}

LAUNCHED=""   # "node:pid ..." of the slurmds this run started, to fail fast when one dies
start_nodes() {
  local i n uts=1
  unshare --uts true 2>/dev/null || { uts=0; log "unshare --uts not permitted: every node reports this host's name"; }
  for i in $(seq 1 "$NODES"); do
    n="$PREFIX$i"
    ours "slurmd-$n" slurmd && continue
    mkdir -p "$DIR/spool/$n"
    if [ "$uts" = 1 ]; then
      launch "slurmd-$n" unshare --uts sh -c "hostname $n && exec slurmd -D -N $n"
    else
      launch "slurmd-$n" slurmd -D -N "$n"
    fi
    LAUNCHED="$LAUNCHED $n:$(cat "$DIR/pids/slurmd-$n.pid")"
  done
}

nodes_up() { # every node registered and responding (idle, or busy when re-run on a live cluster)
  local states count
  states=$(sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null | sort -u)
  count=$(sinfo -h -N -p "$PARTITION" -o '%N' 2>/dev/null | sort -u | wc -l)
  [ -n "$states" ] && [ "$count" = "$NODES" ] && ! grep -qvxE 'idle|mix|alloc|comp' <<<"$states"
}

wait_nodes_up() {
  local end=$(($(date +%s) + TIMEOUT)) np bad
  until nodes_up; do
    for np in $LAUNCHED; do
      if ! is_alive "${np#*:}"; then   # (its name is sh until it execs slurmd)
        tail -n 5 "$DIR/log/slurmd-${np%%:*}.out" "$DIR/log/slurmd-${np%%:*}.log" 2>/dev/null || true
        die "slurmd of ${np%%:*} exited (see $DIR/log/slurmd-${np%%:*}.{out,log})"
      fi
    done
    # nodes left DOWN or DRAINED by an unclean stop come back with RESUME
    bad=$(sinfo -h -N -p "$PARTITION" -t down,drain,fail -o '%N' 2>/dev/null | sort -u | paste -sd, || true)
    [ -z "$bad" ] || scontrol update NodeName="$bad" State=RESUME >/dev/null 2>&1 || true
    [ "$(date +%s)" -lt "$end" ] || { sinfo -N || true; die "nodes not up after ${TIMEOUT}s (logs: $DIR/log)"; }
    sleep 0.3
  done
}

cmd_start() {
  refuse_foreign_config
  install_packages
  write_configs
  add_hosts_line
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_nodes
  wait_nodes_up
  log "cluster '$CLUSTER' ready in $(elapsed): $NODES nodes x $CPUS CPUs, $GPUS fake GPUs each, partition '$PARTITION'"
  sinfo
}

cmd_stop() { # --purge: also delete $DIR and our configs
  local left f
  if [ -d "$DIR" ]; then
    stop_slurm
    stop_daemon slurmdbd slurmdbd
    stop_daemon mariadb mariadbd
    stop_daemon munged munged
  fi
  remove_hosts_line
  left=$(slurmstepds)
  [ -z "$left" ] || log "warning: slurmstepd still running (pids: $(echo $left)); they end with their job"
  if [ "${1:-}" = --purge ]; then
    rm -rf "$DIR"
    for f in "$CONF" "$DBD_CONF" "$GRES_CONF"; do
      [ -f "$f" ] && written_by_us "$f" && rm -f "$f"
    done
    log "purged $DIR and our configs in $ETC (the Debian packages stay installed)"
  fi
  log "stopped"
}

cmd_status() { # exit 0 only if every daemon runs (munged may be a foreign one) and every node responds
  local rc=0 name comm i
  for name in munged:munged mariadb:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld \
    $(for i in $(seq 1 "$NODES"); do echo "slurmd-$PREFIX$i:slurmd"; done); do
    comm=${name#*:}; name=${name%%:*}
    if ours "$name" "$comm"; then
      printf '  %-14s running (pid %s)\n' "$name" "$(cat "$DIR/pids/$name.pid")"
    elif [ "$name" = munged ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      printf '  %-14s running (not started by this script)\n' "$name"
    else
      printf '  %-14s stopped\n' "$name"; rc=1
    fi
  done
  if ours slurmctld slurmctld; then sinfo -N || true; nodes_up || rc=1; fi
  return $rc
}

[ "$(id -u)" = 0 ] || die "must run as root (the daemons and the test jobs run as root)"
case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop "${2:-}" ;;
  status) cmd_status ;;
  *) echo "usage: $0 start | stop [--purge] | status" >&2; exit 2 ;;
esac
