"""Subprocess bodies for the checkpoint tests: jobs that die mid-save or run on two processes.

Modes:
  killed WORKDIR
      save step 1 and let it finish; start an asynchronous save of step 2 (a ~32 MB state, so the write takes
      a while) and SIGKILL this process as soon as Orbax's temporary directory for step 2 appears.
  distributed PORT PROCESS_ID WORKDIR flag|service
      one of 2 processes x 4 CPU devices: save a state sharded over the 8-device mesh together with this
      process's data-iterator state, then send SIGTERM to process 0 alone and record at which steps
      `should_stop_for_preemption` says stop. `flag`: JAX's preemption service off, so our SIGTERM flag and
      its all-gather decide (asked at steps 41, 45, 50). `service`: JAX's service catches SIGTERM and Orbax's
      sync point decides (asked every step from 41; the first "stop" step is saved). Prints one "RESULT" line.
  damaged PORT PROCESS_ID WORKDIR data|state
      one of 2 processes: save steps 4 and 8, then process 1 alone cannot read its part of step 8: its
      data-iterator state is garbled (`data`: fails after Orbax's restore), or reading its shards of the state
      fails (`state`: inside Orbax's restore, before its closing barrier). Resuming must fail on both
      processes, naming step 8; with the fallback both resume from step 4 (never one from 8 and the other
      from 4). Prints one "RESULT" line.
"""
import os
import signal
import sys
import time

import numpy as np

KILLED_SHAPE = (2048, 4096)  # float32: 32 MiB of random (incompressible) values


def killed_state(step: int):
    """The state saved at `step` by the `killed` job: its values tell the steps apart."""
    import jax.numpy as jnp

    values = np.random.default_rng(step).standard_normal(KILLED_SHAPE, dtype=np.float32)
    return {"weights": jnp.asarray(values), "step": jnp.asarray(step, jnp.int32)}


def killed(workdir: str) -> None:
    from cmjax import checkpointing

    checkpointer = checkpointing.Checkpointer(workdir, save_every=1, keep=5, async_save=True)
    assert checkpointer.save(1, killed_state(1))
    checkpointer.wait()
    state = killed_state(2)
    assert checkpointer.save(2, state)
    root = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 60
    while time.time() < deadline:
        if any(name.startswith("2.") and "tmp" in name for name in os.listdir(root)):
            os.kill(os.getpid(), signal.SIGKILL)
        if "2" in os.listdir(root):
            sys.exit(3)  # the save finished before we could kill it: the test would prove nothing
        time.sleep(0.001)
    sys.exit(4)


class CountingIterator:
    """Stand-in data iterator: its state is the process index and how many batches it has given."""

    def __init__(self, process_index: int, position: int = 0):
        self.process_index, self.position = process_index, position

    def get_state(self) -> bytes:
        return f"process={self.process_index} position={self.position}".encode()

    def set_state(self, state: bytes) -> None:
        fields = dict(part.split("=") for part in state.decode().split())
        self.process_index, self.position = int(fields["process"]), int(fields["position"])


def distributed_state(mesh):
    """A state sharded over both processes' devices; values known to every process."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    kernel = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    return {
        "kernel": jax.device_put(jnp.asarray(kernel), NamedSharding(mesh, P("data", "fsdp"))),
        "step": jax.device_put(jnp.asarray(40, jnp.int32), NamedSharding(mesh, P())),
    }


def distributed(port: int, process_id: int, workdir: str, preemption: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", preemption == "service")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from cmjax import checkpointing, sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    checkpointer = checkpointing.Checkpointer(workdir, save_every=20, keep=2, preemption_check_every=10)
    iterator = CountingIterator(process_id, position=100 + process_id)
    assert checkpointer.save(40, distributed_state(mesh), iterator)
    checkpointer.wait()

    if process_id == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # only this process is told
    if preemption == "flag":
        decisions = [checkpointer.should_stop_for_preemption(step) for step in (41, 45, 50)]
    else:
        decisions = []
        for step in range(41, 1000):  # a stand-in train loop: one call per step, as the sync point requires
            if checkpointer.should_stop_for_preemption(step):
                decisions.append(step)
                assert checkpointer.save(step, distributed_state(mesh), iterator, force=True)
                checkpointer.wait()
                break
            time.sleep(0.01)
    restored_iterator = CountingIterator(-1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            distributed_state(mesh))
    state, step = checkpointer.restore(abstract, restored_iterator, step=40)
    local_rows = sorted({int(s.index[0].start or 0) for s in state["kernel"].addressable_shards})
    checkpointer.close()
    print(f"RESULT decisions={decisions} step={step} iterator={restored_iterator.get_state().decode()!r} "
          f"rows={local_rows}", flush=True)


def damaged(port: int, process_id: int, workdir: str, what: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from cmjax import checkpointing, sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    checkpointer = checkpointing.Checkpointer(workdir, save_every=4, keep=3)
    for step in (4, 8):
        assert checkpointer.save(step, distributed_state(mesh), CountingIterator(process_id, position=step))
        checkpointer.wait()
    step_dir = os.path.join(workdir, "checkpoints", "8")
    if process_id == 1 and what == "data":
        with open(os.path.join(step_dir, "data", checkpointing.data_state_filename(1, 2)), "wb") as f:
            f.write(b"garbled")
    if process_id == 1 and what == "state":
        # Reading this process's shards of step 8 fails (as a TensorStore read of a damaged file does). These
        # small arrays are stored inline in OCDBT nodes that every process reads, so the damage is simulated.
        import orbax.checkpoint as ocp

        original = ocp.StandardCheckpointHandler.restore

        def restore(self, directory, *args, **kwargs):
            if os.path.basename(os.path.dirname(str(directory))) == "8":
                raise ValueError(f'DATA_LOSS: Error reading "kernel/1.0" in OCDBT database at local file '
                                 f'"{directory}/": simulated damage')
            return original(self, directory, *args, **kwargs)

        ocp.StandardCheckpointHandler.restore = restore
    multihost_utils.sync_global_devices("damaged")  # neither process reads before the other has damaged
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            distributed_state(mesh))
    try:
        checkpointer.resume(abstract, CountingIterator(-1))
        strict = "resumed"
    except checkpointing.CheckpointReadError as error:
        strict = "error naming 8" if "checkpoint 8: cannot read" in str(error) and "is 4" in str(error) else str(error)
    iterator = CountingIterator(-1)
    _, step = checkpointer.resume(abstract, iterator, fallback=True)
    checkpointer.close()
    print(f"RESULT strict={strict!r} fallback_step={step} position={iterator.position}", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "killed":
        killed(sys.argv[2])
    elif mode == "distributed":
        distributed(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif mode == "damaged":
        damaged(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
