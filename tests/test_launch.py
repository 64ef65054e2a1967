"""launch/*.sh: the commands each script prints under --dry-run, and a real 2-process × 4-device local run."""
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def script(name, *args, env=None, check=True):
    result = subprocess.run(["bash", os.path.join(LAUNCH, name), *args], cwd=ROOT, capture_output=True, text=True,
                            env=env or dict(os.environ), timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(output):
    """The printed commands, shell-split, without comment lines."""
    return [shlex.split(line) for line in output.splitlines() if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------------------
# local_multiprocess.sh


def test_local_dry_run_wires_every_process_to_one_coordinator():
    out = script("local_multiprocess.sh", "--processes=3", "--devices=2", "--config=configs/digits.py:smoke",
                 "--workdir=/tmp/w", "--port=23456", "--python=/usr/bin/python3", "--dry-run", "--",
                 "--config.total_steps=5").stdout
    cmds = commands(out)
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[0] == "env" and "JAX_PLATFORMS=cpu" in cmd
        xla = next(a for a in cmd if a.startswith("XLA_FLAGS="))
        assert xla.split()[-1] == "--xla_force_host_platform_device_count=2"
        assert xla.count("device_count") == 1  # the caller's own device count is replaced, not duplicated
        main = cmd[cmd.index("/usr/bin/python3"):]
        assert main[:3] == ["/usr/bin/python3", "-m", "cmjax.main"]
        assert "--coordinator_address=127.0.0.1:23456" in main
        assert "--num_processes=3" in main and f"--process_id={i}" in main
        assert "--config=configs/digits.py:smoke" in main and "--workdir=/tmp/w" in main
        assert main[-1] == "--config.total_steps=5"


def test_local_rejects_missing_and_bad_arguments():
    assert script("local_multiprocess.sh", "--processes=2", "--dry-run", check=False).returncode == 2
    bad = script("local_multiprocess.sh", "--processes=0", "--config=c", "--workdir=w", "--dry-run", check=False)
    assert bad.returncode == 2 and "positive integers" in bad.stderr


@pytest.mark.multiprocess
def test_local_two_processes_train_and_checkpoint(tmp_path):
    """The real thing: 2 processes × 4 CPU devices (one 8-device mesh over gloo) train digits:smoke for 4 steps."""
    from cmjax.data import digits

    data_dir = str(tmp_path / "tfds")
    digits.prepare(data_dir)  # once here, not raced by the two processes
    workdir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "--processes=2", "--devices=4",
         "--config=configs/digits.py:smoke", f"--workdir={workdir}", f"--python={sys.executable}", "--",
         "--config.total_steps=4", "--config.ckpt_every=2", "--config.log_every=1",
         f"--config.data.data_dir={data_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join((workdir / "logs" / f"process_{i}.log").read_text(errors="replace")[-2000:] for i in range(2)
                   if (workdir / "logs" / f"process_{i}.log").exists())
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "all 2 processes finished" in result.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    log0 = (workdir / "logs" / "process_0.log").read_text()
    assert "JAX process 0/2, 4 local / 8 global devices" in log0
    assert "JAX process 1/2, 4 local / 8 global devices" in (workdir / "logs" / "process_1.log").read_text()


# ---------------------------------------------------------------------------------------------------------
# tpu_vm.sh

TPU = ["--name=cm", "--zone=us-central2-b", "--project=proj"]


def test_tpu_create_vm_and_queued_resource():
    vm = commands(script("tpu_vm.sh", "create", *TPU, "--accelerator=v4-32", "--dry-run").stdout)
    assert vm == [["gcloud", "compute", "tpus", "tpu-vm", "create", "cm", "--zone=us-central2-b", "--project=proj",
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
    queued = commands(script("tpu_vm.sh", "create", *TPU, "--accelerator=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                             "--queued", "--spot", "--dry-run").stdout)
    assert queued[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "cm"]
    assert {"--node-id=cm", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
            "--spot", "--zone=us-central2-b"} <= set(queued[0])
    assert queued[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
    assert script("tpu_vm.sh", "create", *TPU, "--dry-run", check=False).returncode == 2  # no --accelerator


def test_tpu_install_and_run_on_all_workers():
    out = script("tpu_vm.sh", "all", *TPU, "--accelerator=v4-32", "--config=configs/imagenet64_ict.py",
                 "--workdir=gs://bkt/runs/in64", "--data-dir=gs://bkt/tfds", "--dry-run", "--",
                 "--config.batch_size=2048").stdout
    cmds = commands(out)
    scp = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert "--worker=all" in scp and len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    install, run = (c[c.index("--command") + 1] for c in ssh)
    assert "pip install" in install and "'jax[tpu]'" in install and "-e ~/cmjax" in install
    remote = shlex.split(run.replace("&&", ";").replace(">", " > ").replace("2 > &1", ""))
    assert "TFDS_DATA_DIR=gs://bkt/tfds" in remote
    assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/runs/in64/jax_cache" in remote
    main = remote[remote.index("cmjax.main") - 2:]
    assert main[:3] == ["python3", "-m", "cmjax.main"]
    expected = {"--config=configs/imagenet64_ict.py", "--workdir=gs://bkt/runs/in64", "--config.batch_size=2048"}
    assert expected <= set(main)
    assert run.rstrip().endswith("&")  # in the background: ssh returns, the job survives the session
    cache = script("tpu_vm.sh", "run", *TPU, "--config=c.py", "--workdir=gs://b/w", "--cache-dir=gs://b/cache",
                   "--dry-run").stdout
    assert "JAX_COMPILATION_CACHE_DIR=gs://b/cache" in cache and "TFDS_DATA_DIR" not in cache


def test_tpu_delete_and_logs():
    assert commands(script("tpu_vm.sh", "delete", *TPU, "--queued", "--dry-run").stdout)[0][:6] == [
        "gcloud", "compute", "tpus", "queued-resources", "delete", "cm"]
    logs = commands(script("tpu_vm.sh", "logs", *TPU, "--worker=3", "--dry-run").stdout)[0]
    assert "--worker=3" in logs and "tail -n 100 -f ~/cmjax_run.log" in logs


# ---------------------------------------------------------------------------------------------------------
# gpu_slurm.sh

SLURM = ["--nodes=2", "--gpus-per-node=8", "--config=configs/imagenet64_ict.py", "--workdir=/shared/run",
         "--port=29500"]


def _no_slurm_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def test_slurm_outside_an_allocation_submits_itself():
    cmd = commands(script("gpu_slurm.sh", *SLURM, "--partition=a100", "--time=2:00:00", "--dry-run", "--",
                          "--config.batch_size=2048", env=_no_slurm_env()).stdout)[0]
    assert cmd[0] == "sbatch"
    assert {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=a100", "--time=2:00:00",
            "--output=/shared/run/slurm-%j.out"} <= set(cmd)
    assert cmd[cmd.index(os.path.join(LAUNCH, "gpu_slurm.sh")) + 1:][-2:] == ["--", "--config.batch_size=2048"]


@pytest.fixture()
def allocation(tmp_path):
    """The environment of a 2-node SLURM job, with `scontrol` answering only the call the script must make."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n'
                        '[ "$*" = "show hostnames gpu-node[07-08]" ] || { echo "unexpected: $*" >&2; exit 3; }\n'
                        "printf 'gpu-node07\\ngpu-node08\\n'\n")
    scontrol.chmod(0o755)
    return dict(_no_slurm_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
                SLURM_JOB_NODELIST="gpu-node[07-08]", SLURM_JOB_NUM_NODES="2")


def test_slurm_inside_an_allocation_runs_one_process_per_gpu(allocation):
    out = script("gpu_slurm.sh", *SLURM, "--data-dir=/shared/tfds", "--dry-run", "--", "--config.batch_size=2048",
                 env=allocation).stdout
    assert "JAX_COMPILATION_CACHE_DIR=/shared/run/jax_cache" in out and "TFDS_DATA_DIR=/shared/tfds" in out
    srun = next(c for c in commands(out) if c[0] == "srun")
    assert {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1", "--kill-on-bad-exit=1"} <= set(srun)
    task = shlex.split(srun[srun.index("-c") + 1])
    assert task[:4] == ["exec", "python3", "-m", "cmjax.main"]
    assert "--coordinator_address=gpu-node07:29500" in task and "--num_processes=16" in task
    assert task[-1] == "--process_id=$SLURM_PROCID"  # expanded by each task's own shell
    assert "--config.batch_size=2048" in task


def test_slurm_one_process_per_node(allocation):
    srun = next(c for c in commands(script("gpu_slurm.sh", *SLURM, "--per=node", "--dry-run", env=allocation).stdout)
                if c[0] == "srun")
    assert "--ntasks-per-node=1" in srun and not any(a.startswith("--gpus-per-task") for a in srun)
    assert "--num_processes=2" in srun[srun.index("-c") + 1]
    bad = script("gpu_slurm.sh", *SLURM, "--dry-run", env=dict(allocation, SLURM_JOB_NODELIST="other[1-2]"),
                 check=False)
    assert bad.returncode != 0  # the coordinator comes from the allocation's own node list
