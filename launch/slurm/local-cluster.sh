#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on loopback, for tests (see
# docs/local-slurm.md): munged, slurmctld and slurmd run as root with every
# file (config, state, spool, logs, munge key and socket) inside DIR, so
# nothing of the host's own configuration is touched.
#
#   launch/slurm/local-cluster.sh start DIR   # prints the SLURM_CONF to export
#   launch/slurm/local-cluster.sh stop DIR    # stops the daemons by their pid files
#
# Needs: root, Debian packages slurm-wlm, munge, libpmix2 (srun --mpi=pmix).
# SSA_SLURM_PORT is slurmctld's port and slurmd uses the next one; by default the
# first free pair from 6817 up, so two test clusters on one host do not collide.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
(($# == 2)) || usage
action=$1
dir=$2

stop_daemons() {
  local pidfile pid
  for pidfile in "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    [[ -r $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

# Cancels every job of this cluster and waits for its processes to end, so no
# slurmstepd or task outlives the daemons.
cancel_jobs() {
  [[ -r $dir/slurm.conf && -r $dir/run/slurmctld.pid ]] || return 0
  kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null || return 0
  local jobs
  jobs=$(SLURM_CONF=$dir/slurm.conf squeue -h -o %i 2>/dev/null || true)
  [[ -n $jobs ]] || return 0
  # shellcheck disable=SC2086
  SLURM_CONF=$dir/slurm.conf scancel $jobs 2>/dev/null || true
  for _ in $(seq 60); do
    [[ -z $(SLURM_CONF=$dir/slurm.conf squeue -h -o %i 2>/dev/null || true) ]] && break
    sleep 0.5
  done
}

case $action in
  stop)
    cancel_jobs
    stop_daemons
    exit 0
    ;;
  start) ;;
  *) usage ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "$0: the test cluster runs its daemons as root" >&2; exit 3; }
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || { echo "$0: $tool not found (apt-get install slurm-wlm munge libpmix2)" >&2; exit 3; }
done

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir"/{state,spool,log,run,munge,tmp}
chmod 700 "$dir/munge"
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
port_busy() { ss -Hltn "( sport = :$1 )" 2>/dev/null | grep -q .; }
port=${SSA_SLURM_PORT:-}
if [[ -z $port ]]; then
  for candidate in $(seq 6817 2 7999); do
    if ! port_busy "$candidate" && ! port_busy $((candidate + 1)); then port=$candidate; break; fi
  done
  [[ -n $port ]] || { echo "$0: no free port pair in 6817-8000" >&2; exit 1; }
fi

# munged with its own key and socket (the host's munged, if any, is left alone).
key=$dir/munge/munge.key
if [[ ! -s $key ]]; then
  dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  chmod 400 "$key"
fi
munged --force --key-file="$key" --socket="$dir/munge/munge.socket" --pid-file="$dir/run/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

# Job ids from a random base: OpenMPI names its session files after the Slurm
# job and step, so two test clusters on one host must not both run "job 2".
first_job=$(((RANDOM % 30000 + 1000) * 100))

cat >"$dir/slurm.conf" <<CONF
ClusterName=ssatest
FirstJobId=$first_job
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
TmpFS=$dir/tmp
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# PMIx's per-step folders go here too: in /tmp they outlive the cluster and a
# later cluster's job with the same id fails to launch ("File exists").
echo "PMIxCliTmpDirBase=$dir/tmp" >"$dir/mpi.conf"

export SLURM_CONF=$dir/slurm.conf
# -c: clear old state (a stale state folder made step launches time out).
slurmctld -c -f "$SLURM_CONF"
slurmd -c -f "$SLURM_CONF"
for _ in $(seq 120); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  if [[ $state == idle* ]]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "$0: the node did not become idle within 60 s (sinfo: '${state:-}'); logs in $dir/log" >&2
stop_daemons
exit 1
