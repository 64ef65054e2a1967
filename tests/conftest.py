"""Test session setup: 8 virtual CPU devices, so every sharding path runs in CI.

The flags must be set before JAX initialises its backend, hence at import time here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU collectives abort a program whose devices do not all reach an all-reduce within 40 s; on a
# loaded 2-core machine 8 virtual devices can be that slow. Subprocesses inherit these flags.
COLLECTIVE_TIMEOUT_FLAGS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600"
)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += " " + COLLECTIVE_TIMEOUT_FLAGS
os.environ["XLA_FLAGS"] = _flags.strip()

# torchvision (and diffusers, lpips, pytorch-fid, which import it) segfaults when imported after TensorFlow
# in this environment (torch 2.14.1, torchvision 0.29.1, tensorflow-cpu 2.21); TensorFlow after it is fine.
# Test modules that compare against PyTorch are collected beside ones that import cmjax.data (TensorFlow),
# in whatever order pytest picks, so torchvision is imported first here when it is installed.
try:
    import torchvision  # noqa: E402, F401
except ImportError:
    pass

# One persistent XLA compilation cache per checkout, shared by the pytest-xdist workers and the subprocesses the
# tests start (through the environment): a program several tests compile (the smoke MLP's step, the samplers,
# the Inception) is compiled once. A fresh clone starts it empty; later runs on the same checkout reuse it.
_CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lpips_random_weights(tmp_path_factory):
    """(lpips.LPIPS(net="vgg") with seeded random VGG16 weights, the .npz cmjax's real converter made of them).

    torchvision's pretrained VGG16 is a download, so tests use random VGG weights (biases included) with the
    linear heads shipped in the lpips package; skips only where torch or lpips is not installed."""
    torch = pytest.importorskip("torch")
    lpips_package = pytest.importorskip("lpips")
    from cmjax.metrics import lpips

    torch.manual_seed(0)
    model = lpips_package.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    features = {}
    for k in range(1, 6):
        for index, layer in getattr(model.net, f"slice{k}").named_children():
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.normal_(layer.bias, std=0.1)  # torchvision starts biases at 0: test them too
                features[f"features.{index}.weight"] = layer.weight.detach().clone()
                features[f"features.{index}.bias"] = layer.bias.detach().clone()
    assert len(features) == 26
    folder = tmp_path_factory.mktemp("lpips_weights")
    torch.save(features, folder / "vgg16_random.pth")
    npz = lpips.convert(str(folder / "vgg16_random.pth"), str(folder / "lpips_vgg16.npz"))
    return model, npz
