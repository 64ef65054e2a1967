"""The command line in this process (`cmjax.main` through absl's `app.run`): every method trains on the embedded
digits from `--config.method.name=X`, and user errors print one line and exit 2 without a traceback.

Subprocess runs of the same command (real exit codes, nothing compiled before a config error) are in
tests/test_train_processes.py (the multiprocess tier).
"""
import json
import os
import sys

import pytest
from absl import app, flags

from cmjax import main as cli

SMOKE = "configs/digits.py:smoke"
QUICK = ["--config.total_steps=2", "--config.ckpt_every=2", "--config.log_every=1",
         "--config.sample.num_images=8", "--config.ema_rates=(0.999,)"]


def _reset_flags():
    """Flags as before any parse: config_flags defines a `config.<path>` flag per override it parses."""
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)


def run_cli(capfd, *args):
    """(exit status, stdout, stderr) of `python -m cmjax.main ARGS`, run in this process."""
    _reset_flags()
    capfd.readouterr()
    argv = ["cmjax.main", *args]
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads the --config.* overrides from sys.argv
    try:
        app.run(cli.main, argv=argv, flags_parser=cli._parse_flags)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = saved_argv
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "tfds")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """method -> workdir of a 2-step CLI run on digits; EDM first (CD and ECT use it as their teacher)."""
    root = tmp_path_factory.mktemp("cli_methods")
    return {"root": root}


def _train(capfd, runs, data_dir, method, *extra):
    workdir = str(runs["root"] / method)
    code, out, err = run_cli(capfd, f"--config={SMOKE}", f"--workdir={workdir}", *QUICK,
                             f"--config.data.data_dir={data_dir}", f"--config.method.name={method}", *extra)
    return workdir, code, out, err


@pytest.mark.parametrize("method", ["edm", "cd", "ct", "ict", "ect", "sct", "scd", "meanflow"])
def test_every_method_trains_on_digits_from_the_command_line(method, runs, data_dir, capfd):
    if method in ("cd", "ect", "scd"):
        if "edm" not in runs:  # the EDM run of this module is the teacher
            runs["edm"] = _train(capfd, runs, data_dir, "edm")[0]
        extra = [f"--config.teacher.workdir={runs['edm']}"]
    else:
        extra = []
    workdir, code, out, err = _train(capfd, runs, data_dir, method, *extra)
    runs[method] = workdir
    assert code == 0, err[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["method"]["name"] == method
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert "Final metrics" in out and f"{workdir}/checkpoints" in out


def test_the_rbg_prng_trains_and_draws_other_noise_than_threefry(runs, data_dir, capfd):
    ict_run = runs.get("ict") or _train(capfd, runs, data_dir, "ict")[0]
    workdir, code, _, err = _train(capfd, {"root": runs["root"] / "rbg"}, data_dir, "ict", "--config.rng_impl=rbg")
    assert code == 0, err[-3000:]
    losses = {}
    for name, run in (("threefry", ict_run), ("rbg", workdir)):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            losses[name] = [json.loads(line)["loss"] for line in f]
    # Same seed, weights and batch; only the noise and σ draws differ.
    assert all(a == a for a in losses["rbg"]) and losses["rbg"][0] != losses["threefry"][0]


def test_compile_mode_reports_a_tpu_slice_from_this_machine(capfd, tmp_path):
    code, out, err = run_cli(capfd, f"--config={SMOKE}", f"--workdir={tmp_path}", "--mode=compile",
                             "--topology=v5e:2x2", "--config.ema_rates=(0.999,)")
    assert code == 0, err[-3000:]
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["target"] == "TPU topology v5e:2x2" and lines["chip"] == "TPU v5e"
    assert lines["fits"].startswith("fits: ") and float(lines[
        "estimated_step_seconds (compiler cost model, not measured)"]) > 0


def _one_line_error(code, err, *fragments):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("cmjax: error: ")]
    assert len(lines) == 1, err[-3000:]
    message = err[err.index(lines[0]):]  # a message may list details on the lines after its first
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_user_errors_print_one_line_and_exit_2(capfd, tmp_path, data_dir, runs):
    workdir = str(tmp_path / "w")
    edm_run = runs.get("edm") or _train(capfd, runs, data_dir, "edm")[0]
    base = [f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *QUICK]
    cases = {
        "unknown key": (base + ["--config.not_a_key=1"], ["--config.not_a_key=1", "configs/default.py"]),
        "misspelt method key": (base + ["--config.method.ict.s11=3"], ["'s11'"]),
        "wrong type": (base + ["--config.method.ict.s1=abc"], ["--config.method.ict.s1=abc"]),
        "unknown variant": ([f"--config={SMOKE}x", f"--workdir={workdir}"], ["'smokex'", "smoke_unet"]),
        "missing config file": (["--config=configs/nothere.py", f"--workdir={workdir}"], ["no such config file"]),
        "indivisible batch": (base + ["--config.batch_size=12"], ["12", "8 devices", "multiple of 8"]),
        "missing teacher": (base + ["--config.method.name=cd"], ["config.teacher.workdir", "--config.method.name=edm"]),
        "unknown method": (base + ["--config.method.name=lcm"], ["'lcm'", "ict"]),
        "missing dataset": (base + ["--config.data.name=cifar10"], ["cifar10"]),
        "flag a mode does not take": (base + ["--step=3"], ["--mode=train does not take --step"]),
        "unknown PRNG": (base + ["--config.rng_impl=philox"], ["config.rng_impl='philox'", "threefry2x32"]),
        "topology for training": (base + ["--topology=v5e:2x2"], ["--mode=train does not take --topology"]),
        "unknown topology": (base + ["--mode=compile", "--topology=v9x:2x2"], ["'v9x:2x2'", "v5p:2x2x2"]),
        "adaptive weight without a head": (
            base + ["--config.method.name=sct", "--config.method.sct.weighting=adaptive"],
            ["weighting='adaptive'", "config.model.logvar_head=True"]),
        "MeanFlow guidance, unconditional": (base + ["--config.method.name=meanflow",
                                                     "--config.method.meanflow.guidance=cfg"],
                                             ["guidance='cfg'", "class-conditional"]),
        "MeanFlow labels without a null label": (
            base + ["--config.method.name=meanflow", "--config.model.num_classes=10"], ["null_label=True"]),
        "iMF sampled at a guidance scale below 1": (
            base + ["--config.method.name=meanflow", "--config.model.num_classes=10", "--config.model.null_label=True",
                    "--config.method.meanflow.guidance=conditioned", "--config.sample.guidance_scale=0.5"],
            ["guidance_scale=0.5", "ω ≥ 1"]),
        "sCD student from a teacher of another time conditioning": (
            base + ["--config.method.name=scd", f"--config.teacher.workdir={edm_run}",
                    "--config.teacher.init_student=True"],
            ["parameterization_kind 'edm'", "--config.method.edm.parameterization_kind=trigflow"]),
        "unknown attention implementation": (
            ["--config=configs/default.py", f"--workdir={workdir}", "--mode=compile",
             "--config.model.attention_impl=splash"], ["attention_impl='splash'", "'flash'"]),
        "ImageNet-256 MeanFlow before its latents are encoded": (
            ["--config=configs/imagenet256_meanflow.py:b2", f"--workdir={workdir}",
             f"--config.data.data_dir={tmp_path / 'no_latents'}"], ["imagenet256_latents", "--mode=encode"]),
    }
    for name, (args, fragments) in cases.items():
        code, _, err = run_cli(capfd, *args)
        _one_line_error(code, err, *fragments)
        assert not os.path.exists(os.path.join(workdir, "checkpoints")), name

    # A file that is not a PyTorch checkpoint, imported: named, with what was expected.
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    code, _, err = run_cli(capfd, "--config=configs/default.py", f"--workdir={tmp_path / 'imported'}",
                           "--mode=import", "--format=openai", f"--input={not_a_checkpoint}")
    _one_line_error(code, err, str(not_a_checkpoint), "not a PyTorch state dict")

    # A checkpoint of another network: the run named, nothing overwritten; --verbose shows the traceback.
    ict_run = runs.get("ict") or _train(capfd, runs, data_dir, "ict")[0]
    before = sorted(os.listdir(os.path.join(ict_run, "checkpoints")))
    mismatch = [f"--config={SMOKE}", f"--workdir={ict_run}", *QUICK, f"--config.data.data_dir={data_dir}",
                "--config.model.hidden_dim=32", "--config.total_steps=4"]
    code, _, err = run_cli(capfd, *mismatch)
    _one_line_error(code, err, "does not match the train state", "saved (64,) vs expected (32,)", "fresh workdir")
    assert sorted(os.listdir(os.path.join(ict_run, "checkpoints"))) == before
    _reset_flags()
    saved_argv, sys.argv = sys.argv, ["cmjax.main", *mismatch, "--verbose"]
    try:
        with pytest.raises(Exception, match="does not match the train state"):
            app.run(cli.main, argv=sys.argv, flags_parser=cli._parse_flags)
    finally:
        sys.argv = saved_argv


def test_meanflow_samples_and_evaluates_from_the_command_line(runs, data_dir, capfd, tmp_path):
    """--mode=sample and --mode=eval of a MeanFlow run use MeanFlow's sampler: 1 step x = ε − u(ε, 0, 1) from
    t = 1 and 2 steps through config.sample.two_step_time; the digits metric scores both."""
    import numpy as np

    workdir = runs.get("meanflow") or _train(capfd, runs, data_dir, "meanflow")[0]
    common = [f"--config={SMOKE}", f"--workdir={workdir}", *QUICK, f"--config.data.data_dir={data_dir}",
              "--config.method.name=meanflow", "--num_samples=16"]
    code, out, err = run_cli(capfd, *common, "--mode=sample", f"--output={tmp_path / 'samples'}")
    assert code == 0, err[-3000:]
    stems = sorted(f for f in os.listdir(tmp_path / "samples") if f.endswith(".npz"))
    assert [s.split("_")[1] for s in stems] == ["1step", "2step"], stems
    one, two = (np.load(tmp_path / "samples" / s)["images"] for s in stems)
    assert one.shape == two.shape == (16, 8, 8, 1) and one.dtype == np.uint8  # (2 steps trained: u ≈ 0, x ≈ ε)
    code, out, err = run_cli(capfd, *common[:-1], "--num_samples=128", "--mode=eval", f"--output={tmp_path / 'eval'}")
    assert code == 0, err[-3000:]
    with open(next((tmp_path / "eval").glob("metrics_*.json"))) as f:
        metrics = json.load(f)
    assert metrics["metric"] == "digits" and {"ema0.999_1step/frechet", "ema0.999_2step/frechet"} <= set(metrics)
