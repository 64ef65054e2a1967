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
