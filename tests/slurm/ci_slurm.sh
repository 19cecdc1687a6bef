#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests: Debian's slurmctld/slurmd/munge,
# N slurmd daemons as N fake nodes (n1..nN) on 127.0.0.1, each with fake GPUs, so that
# `sbatch launch/pretrain_8node.sh` is accepted with its headers unchanged.
#
#   bash tests/slurm/ci_slurm.sh install          # apt-get the packages (+ shellcheck) if missing
#   bash tests/slurm/ci_slurm.sh up               # write configs, start munged, slurmctld, N slurmd
#   bash tests/slurm/ci_slurm.sh wait JOBID [S]   # poll every 1 s until the job has left the
#                                                 # queue (requeues included), at most S s
#   bash tests/slurm/ci_slurm.sh down             # cancel jobs, stop what `up` started, restore
#   bash tests/slurm/ci_slurm.sh status           # sinfo + squeue
#
# Needs root and no init system: the daemons are started by hand and stopped by the PIDs
# recorded in $SLURM_CI_DIR/pids (TERM all, then KILL what is left after 15 s). `up` backs
# up /etc/slurm/{slurm,gres}.conf and adds one marked line `127.0.0.1 n1 .. nN` to
# /etc/hosts; `down` puts both back. `down` is safe to run any number of times, also after
# a crashed `up`. No cgroup.conf: proctrack/linuxproc + task/none need none (22.05 has no
# CgroupPlugin=disabled). Facts behind the choices: ../shared/SLURM_NOTES.md.
#
# Variables (defaults):
#   SLURM_CI_DIR=/tmp/pmc-clip-slurm   state, spool, logs, pids, backups, fake GPU files
#   SLURM_CI_NODES=8                   fake nodes
#   SLURM_CI_GPUS=8                    fake GPUs per node
#   SLURM_CI_MIN_CPUS=32               CPUs each node advertises at least (real topology
#                                      from `slurmd -C`, cores scaled up when fewer)
#   SLURM_CI_CTLD_PORT=6817            slurmctld port; slurmd ports are 17001..1700N
#   SLURM_CI_SLURMD_PORT_BASE=17000
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${SLURM_CI_DIR:-/tmp/pmc-clip-slurm}"
nodes="${SLURM_CI_NODES:-8}"
gpus="${SLURM_CI_GPUS:-8}"
min_cpus="${SLURM_CI_MIN_CPUS:-32}"
ctld_port="${SLURM_CI_CTLD_PORT:-6817}"
port_base="${SLURM_CI_SLURMD_PORT_BASE:-17000}"
hosts_marker="# pmc-clip-ci-slurm"
etc=/etc/slurm
packages=(slurmctld slurmd slurm-client munge shellcheck)

log() { echo "[ci_slurm] $*" >&2; }
die() {
  log "error: $*"
  exit 1
}
need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (writes /etc/slurm, /etc/hosts)"; }

cmd_install() {
  need_root
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  if ((${#missing[@]} == 0)); then
    log "installed already: ${packages[*]}"
    return 0
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The package scripts cannot start services here (no init; policy-rc.d says no): harmless.
  apt-get update -qq || die "apt-get update failed (no package registry?)"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
}

# The node line's topology: `slurmd -C`'s, with more cores per socket when it has fewer
# than SLURM_CI_MIN_CPUS CPUs (config_overrides makes slurmd accept the larger count).
topology() {
  local line boards sockets cores threads cpus
  line="$(slurmd -C | head -n1)"
  boards="$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$line")"
  sockets="$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$line")"
  cores="$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$line")"
  threads="$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$line")"
  [[ -n $boards && -n $sockets && -n $cores && -n $threads ]] || die "cannot parse: $line"
  cpus=$((boards * sockets * cores * threads))
  if ((cpus < min_cpus)); then
    cores=$(((min_cpus + boards * sockets * threads - 1) / (boards * sockets * threads)))
    cpus=$((boards * sockets * cores * threads))
  fi
  echo "CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")"
}

render() { # template -> stdout
  sed -e "s|@DIR@|$dir|g" -e "s|@NODES@|$nodes|g" -e "s|@GPUS@|$gpus|g" \
    -e "s|@GPU_LAST@|$((gpus - 1))|g" -e "s|@CPUS@|$min_cpus|g" \
    -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
    -e "s|@PORT_FIRST@|$((port_base + 1))|g" -e "s|@PORT_LAST@|$((port_base + nodes))|g" \
    -e "s|@TOPOLOGY@|$(topology)|g" "$1"
}

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# Start a daemon that forks and writes a pid file; record the pid for `down`.
start_daemon() { # name pidfile command...
  local name="$1" pidfile="$2" i
  shift 2
  "$@" || die "$name failed to start; see $dir/log"
  for ((i = 0; i < 100; i++)); do
    if [[ -s $pidfile ]] && alive "$(cat "$pidfile")"; then
      cp "$pidfile" "$dir/pids/$name"
      return 0
    fi
    sleep 0.1
  done
  die "$name wrote no live pid to $pidfile; see $dir/log"
}

cmd_up() {
  need_root
  for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null || die "$bin not installed: run '$0 install' first"
  done
  # Leftovers from an earlier run that died before `down`: clean them up first.
  if [[ -d $dir/pids ]]; then
    log "state from an earlier run in $dir: stopping it first"
    cmd_down
  fi
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    die "a slurmctld/slurmd not started by this script is running; refusing to touch it"
  fi
  rm -rf "$dir/state" "$dir/spool" "$dir/run" "$dir/gpu"
  mkdir -p "$dir"/{state,run,log,pids,gpu,etc-backup}
  for ((i = 1; i <= nodes; i++)); do mkdir -p "$dir/spool/n$i"; done
  for ((i = 0; i < gpus; i++)); do ln -s /dev/null "$dir/gpu/nvidia$i"; done

  # /etc/slurm: keep what is there (once: a second `up` must not back up our own files).
  mkdir -p "$etc"
  for f in slurm.conf gres.conf; do
    if [[ -e $etc/$f && ! -e $dir/etc-backup/$f && ! -e $dir/etc-backup/$f.absent ]]; then
      cp -a "$etc/$f" "$dir/etc-backup/$f"
    elif [[ ! -e $etc/$f ]]; then
      touch "$dir/etc-backup/$f.absent"
    fi
  done
  render "$here/slurm.conf.in" >"$etc/slurm.conf"
  render "$here/gres.conf.in" >"$etc/gres.conf"

  # Fake node names must resolve: the launch script's rendezvous host is `n1`. Written in
  # place (not `sed -i`): /etc/hosts is often a bind mount that cannot be renamed over.
  if ! grep -qF "$hosts_marker" /etc/hosts; then
    local names=""
    for ((i = 1; i <= nodes; i++)); do names+=" n$i"; done
    echo "127.0.0.1$names $hosts_marker" >>/etc/hosts
  fi

  # munge: reuse a running one (not ours to stop), else start it as user munge.
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running: using it"
  else
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    mkdir -p /run/munge && chown munge:munge /run/munge
    start_daemon munged /run/munge/munged.pid runuser -u munge -- /usr/sbin/munged
  fi

  start_daemon slurmctld "$dir/run/slurmctld.pid" /usr/sbin/slurmctld
  for ((i = 1; i <= nodes; i++)); do
    start_daemon "slurmd-n$i" "$dir/run/slurmd-n$i.pid" /usr/sbin/slurmd -N "n$i"
  done

  local deadline=$((SECONDS + 30)) idle
  while ((SECONDS < deadline)); do
    idle="$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)"
    if ((idle == nodes)); then
      log "up: $nodes nodes idle ($(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' '))"
      return 0
    fi
    sleep 0.2
  done
  sinfo -N -l >&2 || true
  die "nodes not idle after 30 s; logs in $dir/log"
}

cmd_wait() {
  local job="${1:?usage: wait JOBID [TIMEOUT_S]}" timeout="${2:-300}" state last="" info
  local deadline=$((SECONDS + timeout))
  while true; do
    # squeue lists a job until it has finished for good (a requeued job stays, PENDING).
    state="$(squeue -h -j "$job" -o '%T' 2>/dev/null || true)"
    if [[ -z $state ]]; then
      info="$(scontrol show job -o "$job" 2>/dev/null || true)"
      [[ -n $info ]] || die "job $job unknown to slurmctld"
      grep -o 'JobId=[0-9]* \|JobState=[A-Z_]* \|Restarts=[0-9]* \|ExitCode=[0-9:]* ' <<<"$info" | tr -d '\n'
      echo
      return 0
    fi
    if [[ $state != "$last" ]]; then
      log "job $job: $state (${SECONDS}s)"
      last="$state"
    fi
    if ((SECONDS >= deadline)); then
      log "job $job still $state after ${timeout}s: cancelling it"
      scontrol show job "$job" >&2 || true
      scancel "$job" || true
      return 124
    fi
    sleep 1
  done
}

stop_pids() { # name... : TERM all, wait up to 15 s, then KILL
  local name pid pids=() deadline
  for name in "$@"; do
    [[ -s $dir/pids/$name ]] || continue
    pid="$(cat "$dir/pids/$name")"
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if alive "$pid"; then
      log "pid $pid ignored TERM for 15 s: KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for name in "$@"; do rm -f "$dir/pids/$name"; done
}

cmd_down() {
  need_root
  local names=() i deadline
  if [[ -s $dir/pids/slurmctld ]] && alive "$(cat "$dir/pids/slurmctld")"; then
    # Jobs first: killing slurmd does not stop running job steps.
    squeue -h -o '%i' 2>/dev/null | xargs -r scancel 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while [[ -n "$(squeue -h -t all -o '%i %T' 2>/dev/null | grep -v -E 'COMPLETED|CANCELLED|FAILED|TIMEOUT|PREEMPTED|NODE_FAIL|BOOT_FAIL|DEADLINE|OUT_OF_MEMORY' || true)" ]] &&
      ((SECONDS < deadline)); do
      sleep 0.5
    done
  fi
  names=(slurmctld)
  for ((i = 1; i <= nodes; i++)); do names+=("slurmd-n$i"); done
  stop_pids "${names[@]}"
  stop_pids munged # only present when `up` started it

  for f in slurm.conf gres.conf; do
    if [[ -e $dir/etc-backup/$f ]]; then
      cp -a "$dir/etc-backup/$f" "$etc/$f" && rm -f "$dir/etc-backup/$f"
    elif [[ -e $dir/etc-backup/$f.absent ]]; then
      rm -f "$etc/$f" "$dir/etc-backup/$f.absent"
    fi
  done
  if grep -qF "$hosts_marker" /etc/hosts; then
    local kept
    kept="$(grep -vF "$hosts_marker" /etc/hosts || true)"
    printf '%s\n' "$kept" >/etc/hosts
  fi
  rm -rf "$dir/pids"
  log "down: daemons stopped, /etc/slurm and /etc/hosts restored (logs kept in $dir/log)"
}

cmd_status() {
  sinfo -N -l || true
  squeue -t all -l || true
}

case "${1:-}" in
install) cmd_install ;;
up) cmd_up ;;
wait) cmd_wait "${@:2}" ;;
down) cmd_down ;;
status) cmd_status ;;
*)
  sed -n '2,14p' "$0" >&2
  exit 2
  ;;
esac
