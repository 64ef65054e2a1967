#!/usr/bin/env bash
# N cmjax processes on this machine, M virtual CPU devices each, joined by jax.distributed over 127.0.0.1:
# the multi-host code path (one global mesh of N×M devices, per-process data, gloo collectives) on a laptop.
#
#   launch/local_multiprocess.sh --processes=2 --devices=4 --config=configs/digits.py:smoke --workdir=/tmp/mp \
#       [--port=PORT] [--python=PYTHON] [--dry-run] [-- --config.total_steps=10 ...]
#
# Process i logs to WORKDIR/logs/process_<i>.log; the script waits for all of them and exits non-zero (after
# stopping the others) as soon as one fails. Arguments after `--` go to every process's `python -m cmjax.main`.
# --dry-run prints the commands (with their environment) instead of running them.
set -euo pipefail

processes=2
devices=4
config=""
workdir=""
port=""
python="${PYTHON:-python}"
dry_run=0
extra=()

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "local_multiprocess.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
  shift
done
[[ -n "$config" && -n "$workdir" ]] || { echo "local_multiprocess.sh: --config and --workdir are required" >&2; exit 2; }
[[ "$processes" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "local_multiprocess.sh: --processes and --devices must be positive integers" >&2; exit 2; }
if [[ -z "$port" ]]; then  # a free port, chosen by the OS
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
xla_flags=""
for flag in ${XLA_FLAGS:-}; do  # keep the caller's XLA flags, except its device count
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="${flag} "
done
xla_flags+="--xla_force_host_platform_device_count=${devices}"
commands=()
for ((i = 0; i < processes; i++)); do
  commands+=("$(printf '%q ' env JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags}" "PYTHONPATH=${repo_root}${PYTHONPATH:+:$PYTHONPATH}" \
    "$python" -m cmjax.main "--config=${config}" "--workdir=${workdir}" \
    "--coordinator_address=127.0.0.1:${port}" "--num_processes=${processes}" "--process_id=${i}" \
    ${extra[@]+"${extra[@]}"})")
done

if [[ "$dry_run" == 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

mkdir -p "${workdir}/logs"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
for ((i = 0; i < processes; i++)); do
  (cd "$repo_root" && eval "${commands[$i]}") >"${workdir}/logs/process_${i}.log" 2>&1 &
  pids+=("$!")
  echo "process ${i}/${processes}: pid ${pids[$i]}, log ${workdir}/logs/process_${i}.log"
done

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  # `wait -n -p` names the process that ended (bash >= 5.1).
  if wait -n -p ended "${remaining[@]}"; then
    :
  else
    code=$?
    echo "local_multiprocess.sh: a process (pid ${ended}) failed with status ${code}; stopping the others." >&2
    status=$code
    break
  fi
  next=()
  for pid in "${remaining[@]}"; do [[ "$pid" != "$ended" ]] && next+=("$pid"); done
  remaining=(${next[@]+"${next[@]}"})
done
if [[ "$status" != 0 ]]; then
  for ((i = 0; i < processes; i++)); do
    echo "--- tail of ${workdir}/logs/process_${i}.log" >&2
    tail -n 20 "${workdir}/logs/process_${i}.log" >&2 || true
  done
  exit "$status"
fi
trap - EXIT
echo "all ${processes} processes finished; outputs in ${workdir}"
