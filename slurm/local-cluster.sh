#!/bin/bash
# A throw-away single-node SLURM cluster on this machine, from Debian's packages, for the tests
# (tests/test_slurm_cluster.py) and for trying the scripts in this folder without a real cluster. Needs root.
#
#   slurm/local-cluster.sh install          # apt-get install munge slurmctld slurmd slurm-client (if missing)
#   slurm/local-cluster.sh start [DIR]      # install if needed, write DIR/slurm.conf, start munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf        # what sbatch / srun / scontrol / squeue read (start prints it)
#   slurm/local-cluster.sh status [DIR]     # the daemons' pids and sinfo
#   slurm/local-cluster.sh stop [DIR]       # stop the three daemons by the pids they wrote
#
# DIR (default $LOCAL_CLUSTER_DIR, else /tmp/emerdiff-slurm) holds everything: slurm.conf, a munge key and
# socket of its own (the machine's munge, if any, is not touched), state, spool, logs and pid files.
# The node advertises the machine's real CPUs and memory (`slurmd -C`). Partition `debug` (default) has a short
# KillWait (KILL_WAIT, default 5 s, instead of SLURM's 30 s) so that tests see SIGKILL soon; partitions share
# cores between jobs (OverSubscribe=FORCE) so that a 2-core machine can run a few 1-CPU tasks side by side.
# Ports: SLURMCTLD_PORT / SLURMD_PORT (default 6817 / 6818).
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client)
export PATH=$PATH:/usr/sbin:/sbin # the daemons live there

die() {
  echo "local-cluster: $*" >&2
  exit 1
}

install_packages() {
  if command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v sbatch >/dev/null; then
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "SLURM is not installed and installing needs root: apt-get install ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} with this system's package manager"
  # policy-rc.d: apt must not start the system's munge / slurm daemons (this script starts its own)
  local policy=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created=1
  fi
  echo "local-cluster: installing ${PACKAGES[*]} (apt-get)" >&2
  local status=0
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
  } >/tmp/local-cluster-apt.log 2>&1 || status=$?
  if ((created)); then
    rm -f "$policy"
  fi
  ((status == 0)) || die "apt-get failed (exit $status); see /tmp/local-cluster-apt.log"
}

state_dir() {
  local dir=${1:-${LOCAL_CLUSTER_DIR:-/tmp/emerdiff-slurm}}
  mkdir -p "$dir"
  (cd "$dir" && pwd)
}

pid_alive() {
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
  local dir=$1 node host
  node=$(slurmd -C | head -n 1) # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. ... RealMemory=..
  host=$(hostname -s)
  node="NodeName=$host ${node#* }"
  cat >"$dir/slurm.conf" <<EOF
# written by slurm/local-cluster.sh: a single-node test cluster
ClusterName=emerdiff-local
SlurmctldHost=$host
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=defer_no,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=600
KillWait=${KILL_WAIT:-5}
InactiveLimit=0
Waittime=0
MessageTimeout=20
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 DefMemPerCPU=2048
EOF
}

start() {
  local dir
  dir=$(state_dir "${1:-}")
  install_packages
  if pid_alive "$dir/slurmctld.pid" || pid_alive "$dir/slurmd.pid" || pid_alive "$dir/munge/munged.pid"; then
    die "already running in $dir (slurm/local-cluster.sh stop $dir first)"
  fi
  [[ $(id -u) == 0 ]] || die "starting the daemons needs root"
  mkdir -p "$dir"/{ctld,spool,log,munge}
  write_conf "$dir"
  # munge: its own key and socket; munged refuses to run as root and checks that its folders are private
  chown munge:munge "$dir/munge"
  chmod 711 "$dir/munge" # munged: not writable by others, reachable by the clients
  if [[ ! -s $dir/munge/munge.key ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  chmod 711 "$dir"
  runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  slurmctld -f "$dir/slurm.conf"
  slurmd -f "$dir/slurm.conf"
  local i
  for ((i = 0; i < 60; i++)); do
    if SLURM_CONF=$dir/slurm.conf sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "local-cluster: up in $dir; export SLURM_CONF=$dir/slurm.conf" >&2
      return 0
    fi
    sleep 1
  done
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  stop "$dir"
  die "the node did not come up within 60 s (logs above)"
}

stop_pid() {
  local file=$1 name=$2 pid i
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "local-cluster: $name (pid $pid) ignored SIGTERM for 10 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

stop() {
  local dir i
  dir=$(state_dir "${1:-}")
  if pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid"; then
    # end every job of this cluster first: slurmd leaves running jobs' slurmstepd behind when it stops
    SLURM_CONF=$dir/slurm.conf scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
      [[ -z $(SLURM_CONF=$dir/slurm.conf squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  stop_pid "$dir/slurmd.pid" slurmd # slurmd ends its job steps' slurmstepd on the way out
  stop_pid "$dir/slurmctld.pid" slurmctld
  stop_pid "$dir/munge/munged.pid" munged
}

status() {
  local dir name file running=0
  dir=$(state_dir "${1:-}")
  for name in munged slurmctld slurmd; do
    file=$dir/$name.pid
    [[ $name == munged ]] && file=$dir/munge/munged.pid
    if pid_alive "$file"; then
      echo "$name: running, pid $(cat "$file")"
      running=$((running + 1))
    else
      echo "$name: not running"
    fi
  done
  if ((running == 3)); then
    SLURM_CONF=$dir/slurm.conf sinfo
  fi
  ((running == 3))
}

case ${1:-} in
  install) install_packages ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  status) status "${2:-}" ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
