#!/usr/bin/env bash
# Cloud TPU VM (or queued resource) for cmjax: create it, install this checkout on every worker, run a config on
# all workers at once, follow the log, delete it.
#
#   launch/tpu_vm.sh create  --name=cm --zone=us-central2-b --accelerator=v4-32 [--version=tpu-ubuntu2204-base]
#                            [--queued] [--spot] [--project=P]
#   launch/tpu_vm.sh install --name=cm --zone=us-central2-b
#   launch/tpu_vm.sh run     --name=cm --zone=us-central2-b --config=configs/cifar10_ict.py \
#                            --workdir=gs://BUCKET/runs/cifar10_ict --data-dir=gs://BUCKET/tensorflow_datasets \
#                            [--cache-dir=gs://BUCKET/jax_cache] [-- --config.batch_size=2048 --mode=compile ...]
#   launch/tpu_vm.sh logs    --name=cm --zone=us-central2-b [--worker=0]
#   launch/tpu_vm.sh delete  --name=cm --zone=us-central2-b [--queued]
#   launch/tpu_vm.sh all     ...create + install + run...
#
# `run` starts `python -m cmjax.main` on --worker=all in the background (nohup; the log is ~/cmjax_run.log on
# each worker) with TFDS_DATA_DIR, the workdir and JAX's persistent compilation cache on GCS, so a restarted or
# preempted job resumes from its checkpoint and reuses compiled programs. jax.distributed finds the other
# workers by itself on Cloud TPU. Arguments after `--` go to cmjax.main. --dry-run prints every gcloud command
# instead of running it.
set -euo pipefail

action="${1:-}"
[[ -n "$action" && "$action" != -* ]] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
shift
name=""; zone=""; project=""; accelerator=""; version="tpu-ubuntu2204-base"; queued=0; spot=0
config=""; workdir=""; data_dir=""; cache_dir=""; worker=0; dry_run=0; extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --data-dir=*) data_dir="${1#*=}" ;;
    --cache-dir=*) cache_dir="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
need() { for v in "$@"; do [[ -n "${!v}" ]] || { echo "tpu_vm.sh $action: --${v//_/-} is required" >&2; exit 2; }; done; }
need name zone

gcloud_flags=(--zone="$zone")
[[ -n "$project" ]] && gcloud_flags+=(--project="$project")

# Runs a command, or prints it (shell-quoted) under --dry-run.
run_cmd() {
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

create() {
  need accelerator
  local capacity=()
  [[ "$spot" == 1 ]] && capacity=(--spot)
  if [[ "$queued" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources create "$name" --node-id="$name" "${gcloud_flags[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" ${capacity[@]+"${capacity[@]}"}
    if [[ "$dry_run" == 1 ]]; then
      echo "# then, every 60 s until it prints ACTIVE:"
      run_cmd gcloud compute tpus queued-resources describe "$name" "${gcloud_flags[@]}" --format='value(state.state)'
    else
      local state=""
      until [[ "$state" == ACTIVE ]]; do
        state="$(gcloud compute tpus queued-resources describe "$name" "${gcloud_flags[@]}" --format='value(state.state)')"
        echo "queued resource $name: $state"
        case "$state" in FAILED|SUSPENDED) echo "tpu_vm.sh: queued resource $name is $state" >&2; exit 1 ;; esac
        [[ "$state" == ACTIVE ]] || sleep 60
      done
    fi
  else
    run_cmd gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}" \
      --accelerator-type="$accelerator" --version="$version" ${capacity[@]+"${capacity[@]}"}
  fi
}

install() {
  # This checkout's tracked files (uncommitted edits included), copied to every worker and installed there.
  local repo_root archive
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/cmjax-src.tar.gz"
  if [[ "$dry_run" == 1 ]]; then
    echo "(cd $(printf '%q' "$repo_root") && git ls-files -z | tar --null -T - -czf $(printf '%q' "$archive"))"
  else
    (cd "$repo_root" && git ls-files -z | tar --null -T - -czf "$archive")
  fi
  run_cmd gcloud compute tpus tpu-vm scp "$archive" "$name":cmjax-src.tar.gz --worker=all "${gcloud_flags[@]}"
  run_cmd gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gcloud_flags[@]}" --command \
    "mkdir -p ~/cmjax && tar -xzf ~/cmjax-src.tar.gz -C ~/cmjax && python3 -m pip install -q -U 'jax[tpu]' -e ~/cmjax"
}

start() {
  need config workdir
  local cache="${cache_dir:-${workdir%/}/jax_cache}" env_vars main_args
  env_vars="JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$cache")"
  [[ -n "$data_dir" ]] && env_vars="TFDS_DATA_DIR=$(printf '%q' "$data_dir") $env_vars"
  main_args="$(printf '%q ' --config="$config" --workdir="$workdir" ${extra[@]+"${extra[@]}"})"
  run_cmd gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gcloud_flags[@]}" --command \
    "cd ~/cmjax && $env_vars nohup python3 -m cmjax.main $main_args> ~/cmjax_run.log 2>&1 &"
  echo "# started on every worker of $name; follow worker 0 with: launch/tpu_vm.sh logs --name=$name --zone=$zone"
}

logs() {
  run_cmd gcloud compute tpus tpu-vm ssh "$name" --worker="$worker" "${gcloud_flags[@]}" --command "tail -n 100 -f ~/cmjax_run.log"
}

delete() {
  if [[ "$queued" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${gcloud_flags[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet
  fi
}

case "$action" in
  create) create ;;
  install) install ;;
  run) start ;;
  logs) logs ;;
  delete) delete ;;
  all) need accelerator config workdir; create; install; start ;;
  *) echo "tpu_vm.sh: unknown action '$action' (create, install, run, logs, delete, all)" >&2; exit 2 ;;
esac
