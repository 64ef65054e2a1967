#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one cmjax process per GPU (default) or per node, joined by
# jax.distributed with process 0 on the allocation's first host as coordinator.
#
#   launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 --config=configs/imagenet64_ict.py \
#       --workdir=/shared/runs/imagenet64_ict [--data-dir=/shared/tensorflow_datasets] [--cache-dir=DIR] \
#       [--partition=P] [--account=A] [--time=48:00:00] [--per=gpu|node] [--port=12355] [--python=python3] \
#       [--dry-run] [-- --config.batch_size=2048 ...]
#
# Outside an allocation it submits itself with sbatch (log: WORKDIR/slurm-<jobid>.out); inside one (sbatch, or
# salloc then this script) it runs srun. The coordinator is the first host of SLURM_JOB_NODELIST
# (`scontrol show hostnames`); each task passes --coordinator_address, --num_processes (SLURM_NTASKS) and
# --process_id (SLURM_PROCID) to cmjax.main. --dry-run prints the sbatch or srun command instead of running it.
set -euo pipefail

nodes=1; gpus_per_node=8; config=""; workdir=""; data_dir=""; cache_dir=""; partition=""; account=""
time_limit=""; per=gpu; port=12355; python="${PYTHON:-python3}"; dry_run=0; extra=()
all_args=("$@")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus_per_node="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --data-dir=*) data_dir="${1#*=}" ;;
    --cache-dir=*) cache_dir="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_slurm.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$config" && -n "$workdir" ]] || { echo "gpu_slurm.sh: --config and --workdir are required" >&2; exit 2; }
case "$per" in
  gpu) tasks_per_node="$gpus_per_node"; gpu_binding=(--gpus-per-task=1) ;;  # each process sees one GPU
  node) tasks_per_node=1; gpu_binding=() ;;  # one process drives all GPUs of its node
  *) echo "gpu_slurm.sh: --per must be gpu or node, got '$per'" >&2; exit 2 ;;
esac

run_cmd() {
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Not in an allocation: submit this script as a batch job with the same arguments.
  sbatch_flags=(--job-name=cmjax --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus_per_node"
                --output="${workdir%/}/slurm-%j.out")
  [[ -n "$partition" ]] && sbatch_flags+=(--partition="$partition")
  [[ -n "$account" ]] && sbatch_flags+=(--account="$account")
  [[ -n "$time_limit" ]] && sbatch_flags+=(--time="$time_limit")
  [[ "$dry_run" == 1 ]] || mkdir -p "$workdir"
  run_cmd sbatch "${sbatch_flags[@]}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "$0")" "${all_args[@]}"
  exit 0
fi

# Inside the allocation.
allocated_nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$nodes}}"
coordinator_host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
[[ -n "$coordinator_host" ]] || { echo "gpu_slurm.sh: no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'" >&2; exit 1; }
num_processes=$((allocated_nodes * tasks_per_node))
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export JAX_COMPILATION_CACHE_DIR="${cache_dir:-${workdir%/}/jax_cache}"
[[ -n "$data_dir" ]] && export TFDS_DATA_DIR="$data_dir"
# Each task expands its own SLURM_PROCID.
main_args="$(printf '%q ' -m cmjax.main --config="$config" --workdir="$workdir" \
  --coordinator_address="${coordinator_host}:${port}" --num_processes="$num_processes" ${extra[@]+"${extra[@]}"})"
if [[ "$dry_run" == 1 ]]; then
  echo "export JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$JAX_COMPILATION_CACHE_DIR")${TFDS_DATA_DIR:+ TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR")}"
fi
run_cmd srun --nodes="$allocated_nodes" --ntasks-per-node="$tasks_per_node" ${gpu_binding[@]+"${gpu_binding[@]}"} \
  --kill-on-bad-exit=1 --chdir="$repo_root" \
  bash -c "exec $(printf '%q' "$python") $main_args--process_id=\$SLURM_PROCID"
