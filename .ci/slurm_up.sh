#!/usr/bin/env bash
# A one-node Slurm on this machine for the `slurm` tests and bench_scale.py --slurm.
#
#   .ci/slurm_up.sh          start it (idempotent: a running one is left alone); prints SLURM_CONF=...
#   .ci/slurm_up.sh down     stop its daemons and cancel its jobs (the packages stay installed)
#
# Needs root (it starts munged, slurmctld and slurmd) and Debian's slurm-wlm + munge, which it
# installs when missing. Everything it writes lives under $SAMWATCH_SLURM_DIR (default
# /var/spool/samwatch-slurm): a private slurm.conf (no accounting, one partition "ci" with this
# machine's CPUs and memory), the daemons' state, pid files and logs. Exits non-zero, with the
# reason on stderr, when it cannot: callers skip the Slurm tests then.
set -euo pipefail
DIR=${SAMWATCH_SLURM_DIR:-/var/spool/samwatch-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

say() { echo "slurm_up: $*" >&2; }

stop_pid() {  # stop the daemon whose pid file is $1, if it runs
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$file"
}

if [ "${1:-}" = down ]; then
  if [ -f "$CONF" ] && command -v scancel >/dev/null; then scancel --full --user="$(id -un)" 2>/dev/null || true; fi
  stop_pid "$DIR/slurmd.pid"
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munged.pid"
  say "stopped"
  exit 0
fi

# Already up (an earlier call): nothing to do.
if [ -f "$CONF" ] && command -v sinfo >/dev/null && timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "SLURM_CONF=$CONF"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then say "needs root to start munged, slurmctld and slurmd"; exit 2; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { say "slurm-wlm/munge missing and no apt-get to install them"; exit 2; }
  say "installing slurm-wlm and munge (Debian's packages)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; } >"/tmp/samwatch-slurm-apt.log" 2>&1 \
    || { say "apt-get install slurm-wlm munge failed (see /tmp/samwatch-slurm-apt.log)"; exit 2; }
fi

mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/munge"
chmod 755 "$DIR"

# munge: our own key and socket, so a system munged (if any) is not disturbed.
KEY=$DIR/munge/munge.key
SOCKET=$DIR/munge/munge.socket
if [ ! -s "$KEY" ]; then
  dd if=/dev/urandom bs=1 count=1024 of="$KEY" status=none
fi
chmod 400 "$KEY"
stop_pid "$DIR/munged.pid"
munged --force --key-file="$KEY" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"

HOST=$(hostname -s)
# Not the OMP_* variables nproc honours: a Dask nanny sets OMP_NUM_THREADS=1 in its parent, so when
# a test process that ran a LocalCluster starts Slurm, plain nproc made a one-CPU node.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEMORY=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
cat >"$CONF" <<EOF
# Written by samwatch's .ci/slurm_up.sh: a one-node test cluster, no accounting.
ClusterName=samwatch-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=2
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

stop_pid "$DIR/slurmd.pid"
stop_pid "$DIR/slurmctld.pid"
slurmctld -f "$CONF" -c   # -c: a clean start, no state from an earlier run
slurmd -f "$CONF"

for _ in $(seq 150); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    timeout 30 srun -N1 -n1 hostname >/dev/null || { say "srun hostname failed (see $DIR/slurmd.log)"; exit 3; }
    echo "SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.2
done
say "the node did not come up within 30 s (see $DIR/slurmctld.log and $DIR/slurmd.log)"
exit 3
