"""Subprocess body for the data tests: a fresh Python process that reads the pipeline and writes what it saw.

Modes:
  resume DATA_DIR STATE_DIR STEPS OUT.npz
      build the digits pipeline, restore this process's state from STATE_DIR, write the next STEPS batches.
  distributed DATA_DIR PORT PROCESS_ID STEPS OUT.npz
      join a 2-process jax.distributed run (4 CPU devices each), read STEPS batches of `train[:96]`, and
      write this process's rows plus the sum of every global batch computed on the 8-device mesh.
"""
import os
import sys

import numpy as np

RESUME_CONFIG = dict(
    name="digits", split="train", shuffle_buffer=256, random_flip=True, cache=False, prefetch=2, ram_budget_gb=1
)
RESUME_BATCH, RESUME_SEED = 64, 7
DISTRIBUTED_CONFIG = dict(
    name="digits", split="train[:96]", shuffle_buffer=64, random_flip=False, cache=False, prefetch=2,
    ram_budget_gb=1,
)
DISTRIBUTED_BATCH, DISTRIBUTED_SEED = 32, 3


def resume(data_dir: str, state_dir: str, steps: int, out: str) -> None:
    import jax

    from cmjax import sharding
    from cmjax.data import pipeline

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    iterator = pipeline.build(
        dict(RESUME_CONFIG, data_dir=data_dir), mesh, global_batch_size=RESUME_BATCH, seed=RESUME_SEED
    )
    pipeline.restore_state(iterator, state_dir)
    batches = [jax.device_get(next(iterator)) for _ in range(steps)]
    np.savez(out, image=np.stack([b["image"] for b in batches]), label=np.stack([b["label"] for b in batches]))


def distributed(data_dir: str, port: int, process_id: int, steps: int, out: str) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from cmjax import sharding
    from cmjax.data import pipeline

    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    iterator = pipeline.build(
        dict(DISTRIBUTED_CONFIG, data_dir=data_dir), mesh, global_batch_size=DISTRIBUTED_BATCH,
        seed=DISTRIBUTED_SEED,
    )
    total = jax.jit(lambda x: jnp.sum(x.astype(jnp.int32)))  # a cross-process reduction over the global batch
    images, labels, sums, shapes = [], [], [], []
    for _ in range(steps):
        batch = next(iterator)
        shapes.append(batch["image"].shape)
        local = sharding.global_to_host_local(batch)
        images.append(local["image"])
        labels.append(local["label"])
        sums.append(int(total(batch["image"])))
    np.savez(
        out, image=np.stack(images), label=np.stack(labels), global_sum=np.array(sums),
        global_shape=np.array(shapes), process_count=jax.process_count(), device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "resume":
        resume(args[0], args[1], int(args[2]), args[3])
    elif mode == "distributed":
        distributed(args[0], int(args[1]), int(args[2]), int(args[3]), args[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
