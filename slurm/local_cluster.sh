#!/usr/bin/env bash
# Real two-node SLURM cluster (n1, n2 -> 127.0.0.1) on this one machine, for tests/CI.
#   slurm/local_cluster.sh start   # install if needed, start munged+slurmctld+2 slurmd; prints `export SLURM_CONF=...`
#   slurm/local_cluster.sh stop    # kill what start started
#   slurm/local_cluster.sh status  # sinfo
# Usage from a test: eval "$(slurm/local_cluster.sh start)"
# Env: TL_SLURM_DIR (state dir, default /tmp/tl-slurm), TL_SLURM_PORT (slurmctld port, default 6817).
set -euo pipefail

DIR=${TL_SLURM_DIR:-/tmp/tl-slurm}
export SLURM_CONF=$DIR/slurm.conf
NODES=(n1 n2)
CTLD_PORT=${TL_SLURM_PORT:-6817}   # slurmd ports are CTLD_PORT+1, +2

log() { echo "[local_cluster] $*" >&2; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_pkgs() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
    && command -v munged >/dev/null && return
  log "installing slurm + munge with apt-get (log: $DIR/log/apt.log)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
    >"$DIR/log/apt.log" 2>&1 || { tail -n 20 "$DIR/log/apt.log" >&2; exit 1; }
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # already usable
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge: /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 755 /run/munge  # /run is empty without systemd
  runuser -u munge -- munged
  cp /run/munge/munged.pid "$DIR/munged.pid"  # only ours gets stopped by `stop`
}

write_conf() {
  mkdir -p "$DIR/state" "${NODES[@]/#/$DIR/spool/}"
  cat >"$SLURM_CONF" <<EOF
ClusterName=tl-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups in containers: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Both nodes share the host's cores; trust the conf instead of the hardware probe.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds (default 120) before it may start again; 5 is the minimum.
AuthInfo=cred_expire=5
# Backfill (every 30 s by default) is what starts a requeued job once its BeginTime passes.
SchedulerParameters=bf_interval=1,sched_interval=1
# SIGTERM->SIGKILL grace on cancel/requeue (default 30 s); keep finished jobs visible to scontrol for 10 min.
KillWait=5
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((CTLD_PORT + 1)) CPUs=2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((CTLD_PORT + 2)) CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  for _ in $(seq 60); do
    [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) -eq ${#NODES[@]} ]] && return
    sleep 1
  done
  log "ERROR: nodes not idle after 60s"; sinfo -N -l >&2 || true
  for f in "$DIR"/log/*.log; do log "--- $f"; tail -n 20 "$f" >&2; done
  exit 1
}

start() {
  mkdir -p "$DIR/log"
  install_pkgs
  start_munge
  # Job scripts resolve node names (e.g. first host of SLURM_JOB_NODELIST) -> map them to loopback.
  grep -qE '^127\.0\.0\.1\s.*\bn1\b' /etc/hosts || echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
  if ! alive "$DIR/slurmctld.pid"; then
    local p
    for p in $((CTLD_PORT)) $((CTLD_PORT + 1)) $((CTLD_PORT + 2)); do  # e.g. another cluster still up
      if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then log "ERROR: port $p in use; set TL_SLURM_PORT"; exit 1; fi
    done
    write_conf
    slurmctld -c -i  # -c: fresh job state each start; -i: ignore stale node state
  fi
  local n
  for n in "${NODES[@]}"; do alive "$DIR/slurmd-$n.pid" || slurmd -N "$n"; done
  wait_idle
  log "cluster up: $(sinfo -h -o '%P %D %T %N')"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local f pids=()
  if alive "$DIR/slurmctld.pid"; then  # jobs' slurmstepd/processes outlive slurmd: cancel them first
    squeue -h -o %A | xargs -r scancel || true
    for _ in $(seq 30); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid; do
    alive "$f" && pids+=("$(cat "$f")") && kill "$(cat "$f")"
    rm -f "$f"
  done
  for _ in $(seq 20); do  # wait so a following `start` can bind the ports
    local up=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && up=1; done
    ((up)) || return 0; sleep 0.5
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
