"""`aot.compile_report` (`--mode=compile`): the train step compiled from shapes alone, on the 8-device CPU mesh."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cmjax import aot
from configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp_config(hidden_dim=64, num_layers=1, batch_size=256):
    config = digits.get_config()  # the residual MLP: compiles in seconds
    config.model.hidden_dim = hidden_dim
    config.model.num_layers = num_layers
    config.batch_size = batch_size
    config.ema_rates = (0.999,)
    return config


@pytest.fixture(scope="module")
def small_report():
    return aot.compile_report(_mlp_config(), None)


def test_report_has_mesh_parameters_memory_and_flops(small_report):
    r = small_report
    assert r["mesh"] == {"data": 8, "fsdp": 1} and r["num_devices"] == 8
    # MLP(64 wide, 1 block) on 8×8×1 digits, counted by hand: time embedding 128·64+64 → 64·64+64; input
    # 64·64+64; block: LayerNorm 2·64 and three 64×64 dense layers with biases; out LayerNorm 2·64; output 64·64+64.
    h = 64
    expected = (128 * h + h) + (h * h + h) + (64 * h + h) + (2 * h + 3 * (h * h + h)) + 2 * h + (h * 64 + 64)
    assert r["parameters"] == expected
    assert r["parameter_bytes"] == 4 * expected
    # params, RAdam's two moments, one EMA copy (+ scalars): about 4× the parameters.
    assert 4 * r["parameter_bytes"] <= r["train_state_bytes"] < 4 * r["parameter_bytes"] + 4096
    # The state is donated: the outputs alias the inputs and arguments hold the replicated state.
    assert r["per_device_argument_size_in_bytes"] >= r["train_state_bytes"]
    assert r["per_device_alias_size_in_bytes"] >= r["train_state_bytes"]
    assert r["per_device_temp_size_in_bytes"] > 0
    assert r["flops_per_step_per_device"] > 0
    assert r["flops_per_step"] == pytest.approx(8 * r["flops_per_step_per_device"])


def test_flops_grow_with_the_batch(small_report):
    """Forward and backward passes scale with the batch; the optimizer update does not."""
    double = aot.compile_report(_mlp_config(batch_size=512), None)
    ratio = double["flops_per_step_per_device"] / small_report["flops_per_step_per_device"]
    assert 1.7 < ratio <= 2.0, ratio


def test_a_model_larger_than_host_memory_compiles_without_allocating():
    """3 dense layers of 30000² floats: 10.8 GB of parameters, ~54 GB of train state replicated on every device
    (on a machine with less RAM): initialising it would fail, the report only needs its shapes."""
    config = _mlp_config(hidden_dim=30_000, batch_size=8)
    before = sum(a.nbytes for a in jax.live_arrays())
    r = aot.compile_report(config, None)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert r["parameters"] > 2.7e9
    assert r["per_device_argument_size_in_bytes"] > physical
    assert sum(a.nbytes for a in jax.live_arrays()) - before < 2**20


@pytest.mark.multiprocess  # a CLI subprocess
def test_cli_compile_mode_on_one_device_matches_the_sharded_flops(small_report, tmp_path):
    """`--mode=compile` through main.py on a 1-device process: the whole step's FLOPs equal the 8-device per-device
    FLOPs × 8 up to the optimizer update, which every device repeats on its replicated copy."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-m", "cmjax.main", "--config=configs/digits.py", "--mode=compile", f"--workdir={tmp_path}",
         "--config.model.hidden_dim=64", "--config.model.num_layers=1",
         "--config.ema_rates=(0.999,)", "--config.batch_size=256"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert lines["mesh"] == "{'data': 1, 'fsdp': 1}"
    assert int(lines["parameters"]) == small_report["parameters"]
    whole = float(lines["flops_per_step"])
    sharded = small_report["flops_per_step"]
    assert whole <= sharded < 1.15 * whole, (whole, sharded)
    assert int(lines["per_device_temp_size_in_bytes"]) > 0
    assert not os.listdir(tmp_path)  # compile mode writes nothing


# ---- A TPU slice this machine does not have (libtpu's compiler, `--topology`) ---------------------------------


def _require_libtpu():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("libtpu is not installed: the README's test set-up installs it (pip install -e '.[tpu]').")


@pytest.fixture(scope="module")
def tpu_report():
    _require_libtpu()
    return aot.compile_report(_mlp_config(), None, topology="v5e:2x2")


def test_the_step_compiles_for_a_tpu_slice_on_this_machine(tpu_report, small_report):
    r = tpu_report
    assert r["target"] == "TPU topology v5e:2x2" and r["num_devices"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1}
    assert r["device_kind"] == "TPU v5 lite" and r["chip"] == "TPU v5e" and r["hbm_per_chip_bytes"] == 16 * 2**30
    assert r["parameters"] == small_report["parameters"]
    assert r["fits"].startswith("fits: ") and "of 16 GiB (TPU v5e" in r["fits"]
    # A quarter of the batch per chip instead of an eighth: about twice the CPU mesh's per-device FLOPs (the
    # optimizer update, repeated on every device, is not batch-sized; the two compilers count fusions apart).
    ratio = r["flops_per_step_per_device"] / small_report["flops_per_step_per_device"]
    assert 1.5 < ratio < 2.5, ratio
    seconds = r["estimated_step_seconds (compiler cost model, not measured)"]
    assert 0 < seconds < 1
    per_chip = r["estimated_images_per_second_per_chip (compiler estimate)"]
    assert per_chip == pytest.approx(256 / 4 / seconds)
    mfu = r["estimated_mfu (XLA FLOPs / estimated time / bf16 peak)"]
    assert mfu == pytest.approx(r["flops_per_step_per_device"] / seconds / 197e12) and 0 < mfu < 1


def test_a_step_too_large_for_the_chip_is_a_verdict_that_names_what_to_change():
    """A 30000² MLP's train state (54 GiB replicated) cannot fit a 16 GiB v5e chip: the compiler refuses it,
    and the verdict leads with FSDP (the state dominates), then the activation remedies."""
    _require_libtpu()
    config = _mlp_config(hidden_dim=30_000, batch_size=8)
    r = aot.compile_report(config, None, topology="v5e:2x2")
    verdict = r["fits"]
    assert verdict.startswith("does not fit: the compiler needs "), verdict
    assert "of HBM is available" in verdict and "train state 53.76 GiB per chip" in verdict
    assert verdict.index("config.mesh.fsdp, now 1") < verdict.index("per-chip batch (now 2")
    assert "config.model.remat=True" in verdict and "bfloat16" in verdict
    assert "flops_per_step" not in r


def test_the_verdict_orders_its_remedies_by_what_fills_the_chip():
    config = _mlp_config(batch_size=64)
    config.model.remat = True
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    chip = aot.Chip("test chip", 10 * 2**30, 1e12)
    activations = {"peak_estimate_bytes": 12 * 2**30, "argument_size_in_bytes": 1 * 2**30,
                   "temp_size_in_bytes": 11 * 2**30}
    verdict = aot.memory_verdict(config, mesh, activations, chip)
    assert verdict.startswith("does not fit: 12.00 GiB peak per chip of 10 GiB (test chip, 120 %)")
    assert verdict.index("per-chip batch (now 8") < verdict.index("config.mesh.fsdp, now 2")
    assert "remat" not in verdict  # already on
    tight = dict(activations, peak_estimate_bytes=int(9.5 * 2**30))
    assert aot.memory_verdict(config, mesh, tight, chip).startswith("fits (tight): ")
    assert aot.memory_verdict(config, mesh, dict(activations, peak_estimate_bytes=2**30), chip) == (
        "fits: 1.00 GiB peak per chip of 10 GiB (test chip, 10 %)")


def test_an_unknown_topology_is_a_config_error_naming_the_form():
    _require_libtpu()
    from cmjax import errors

    with pytest.raises(errors.ConfigError, match=r"'v9x:2x2'.*v5p:2x2x2"):
        aot.compile_report(_mlp_config(), None, topology="v9x:2x2")
