"""Checkpoints: sharded round trip, keep-N, async, iterator state, resharding restore, refusals, kills, SIGTERM."""
import os
import signal
import socket
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cmjax import checkpointing, sharding
from cmjax.data import digits, pipeline

WORKER = os.path.join(os.path.dirname(__file__), "_checkpoint_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
import _checkpoint_worker as worker  # noqa: E402

DATA_CONFIG = dict(name="digits", split="train", shuffle_buffer=256, random_flip=True, cache=False, prefetch=2,
                   ram_budget_gb=1)


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def make_state(mesh):
    """A small train-state-like pytree: sharded params, Adam state after one update (non-zero), an int step."""
    kernel_sharding = NamedSharding(mesh, P("data", None))
    params = {
        "dense": {
            "kernel": jax.device_put(jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) / 7, kernel_sharding),
            "bias": jax.device_put(jnp.linspace(-1, 1, 8), NamedSharding(mesh, P())),
        }
    }
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    _, opt_state = tx.update(grads, opt_state, params)
    step = jax.device_put(jnp.asarray(12, jnp.int32), NamedSharding(mesh, P()))
    return {"params": params, "opt_state": opt_state, "step": step}


def abstract_of(tree):
    """What a caller passes to `restore`: shapes, dtypes and the target shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_same_values(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def mesh8():
    return sharding.make_mesh({"data": 8, "fsdp": 1})


@pytest.fixture
def checkpointers():
    """Closes every Checkpointer a test opens (pending saves finish; SIGTERM handlers are given back)."""
    opened = []

    def open_checkpointer(workdir, **kwargs):
        kwargs = {"save_every": 1, "keep": 3, **kwargs}
        opened.append(checkpointing.Checkpointer(str(workdir), **kwargs))
        return opened[-1]

    yield open_checkpointer
    for checkpointer in reversed(opened):
        checkpointer.close()


def test_sharded_round_trip_keeps_values_and_shardings(mesh8, tmp_path, checkpointers):
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, async_save=False)
    assert checkpointer.restore(abstract_of(state)) is None  # a fresh workdir: nothing to resume
    assert checkpointer.save(12, state)
    items = os.listdir(tmp_path / "checkpoints" / "12")
    assert "state" in items and "data" not in items  # no iterator given: no data item
    restored, step = checkpointers(tmp_path).restore(abstract_of(state))  # a new manager reads from disk
    assert step == 12
    assert_same_values(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding == want.sharding
    kernel = restored["params"]["dense"]["kernel"]
    assert [s.data.shape for s in kernel.addressable_shards] == [(2, 8)] * 8  # still split over 8 devices


def test_saves_every_k_steps_and_keeps_the_newest_n(mesh8, tmp_path, checkpointers):
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, save_every=3, keep=2)
    started = [step for step in range(1, 11) if checkpointer.save(step, state)]
    assert started == [3, 6, 9]
    assert checkpointer.save(10, state, force=True)  # e.g. the final step or a preemption
    assert not checkpointer.save(10, state, force=True)  # already saved: no error, nothing new
    checkpointer.wait()
    assert checkpointer.all_steps() == [9, 10] and checkpointer.latest_step() == 10
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [9, 10]


def test_async_save_copies_the_state_before_returning(mesh8, tmp_path, checkpointers):
    state = make_state(mesh8)
    expected = jax.device_get(state)
    checkpointer = checkpointers(tmp_path, async_save=True)
    assert checkpointer.save(5, state)
    # The next train step donates the state's buffers; the save in flight must not need them any more.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    checkpointer.wait()
    restored, step = checkpointer.restore(abstract_of(make_state(mesh8)))
    assert step == 5
    assert_same_values(jax.device_get(restored), expected)


def test_data_state_file_names_match_the_pipeline():
    for index, count in [(0, 1), (3, 8), (511, 1024)]:
        assert checkpointing.data_state_filename(index, count) == pipeline.state_filename(index, count)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(path)
    return path


def test_data_iterator_state_is_in_the_same_checkpoint_and_resumes_the_stream(mesh8, data_dir, tmp_path,
                                                                               checkpointers):
    def build():
        return pipeline.build(dict(DATA_CONFIG, data_dir=data_dir), mesh8, global_batch_size=64, seed=3)

    iterator = build()
    for _ in range(3):
        next(iterator)
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path)
    assert checkpointer.save(3, state, iterator)
    checkpointer.wait()
    expected = [jax.device_get(next(iterator)) for _ in range(2)]  # the stream moves on after the save

    data_item = tmp_path / "checkpoints" / "3" / "data"
    assert (data_item / pipeline.state_filename(0, 1)).exists()
    resumed = build()
    _, step = checkpointers(tmp_path).restore(abstract_of(state), resumed)
    assert step == 3
    for want in expected:
        got = jax.device_get(next(resumed))
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    fresh = jax.device_get(next(build()))
    assert not np.array_equal(fresh["label"], expected[0]["label"])  # a restore that did nothing would differ
    # The item is the pipeline's own per-process layout, readable without Orbax too.
    by_pipeline = build()
    pipeline.restore_state(by_pipeline, str(data_item))
    np.testing.assert_array_equal(jax.device_get(next(by_pipeline))["label"], expected[0]["label"])


def test_restore_without_a_saved_data_state_says_how_to_continue(mesh8, tmp_path, checkpointers):
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, async_save=False)
    checkpointer.save(1, state)
    with pytest.raises(FileNotFoundError, match="holds no data iterator state.*without `data_iterator`"):
        checkpointer.restore(abstract_of(state), worker.CountingIterator(0))


def test_step_zero_checkpoint_without_data_state_starts_the_stream_fresh(mesh8, tmp_path, checkpointers):
    # Imported weights are saved at step 0 with no data stream: training starts from them at the data's start.
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, async_save=False)
    checkpointer.save(0, state)
    iterator = worker.CountingIterator(0, position=0)
    _, step = checkpointer.restore(abstract_of(state), iterator)
    assert step == 0 and iterator.get_state() == b"process=0 position=0"
    checkpointer.save(1, state)  # past step 0 a missing data state is still an error (covered above)
    with pytest.raises(FileNotFoundError, match="holds no data iterator state"):
        checkpointer.restore(abstract_of(state), iterator, step=1)


@pytest.mark.parametrize("target", ["data2_fsdp4", "four_devices"])
def test_restore_onto_a_different_mesh_reshards(mesh8, tmp_path, checkpointers, target):
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, async_save=False)
    checkpointer.save(7, state)
    if target == "data2_fsdp4":
        mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
        kernel_spec, kernel_shard = P("fsdp", "data"), (4, 4)
    else:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 4}, devices=jax.devices()[:4])
        kernel_spec, kernel_shard = P(None, "fsdp"), (16, 2)

    def target_sharding(path, leaf):
        spec = kernel_spec if leaf.ndim == 2 else P()  # the kernel and its Adam moments; the rest replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    abstract = jax.tree_util.tree_map_with_path(target_sharding, state)
    restored, step = checkpointers(tmp_path).restore(abstract)
    assert step == 7
    assert_same_values(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
    kernel = restored["params"]["dense"]["kernel"]
    assert len(kernel.sharding.device_set) == mesh.size
    assert {s.data.shape for s in kernel.addressable_shards} == {kernel_shard}


def test_mismatched_tree_names_keys_shapes_and_the_fix(mesh8, tmp_path, checkpointers):
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, async_save=False)
    checkpointer.save(4, state)
    abstract = abstract_of(state)
    abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 32), jnp.float32)  # a wider model
    abstract["params"]["extra"] = {"scale": jax.ShapeDtypeStruct((3,), jnp.float32)}  # a new layer
    del abstract["params"]["dense"]["bias"]  # a layer without bias
    with pytest.raises(checkpointing.CheckpointMismatchError) as raised:
        checkpointer.restore(abstract)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert "shape differs: params/dense/kernel saved (16, 8) vs expected (16, 32)" in message
    assert "missing from checkpoint: params/extra/scale (expected shape (3,))" in message
    assert "not in the config's state: params/dense/bias (saved shape (8,))" in message
    assert "model/optimizer config that wrote it" in message and "fresh workdir" in message
    assert str(tmp_path / "checkpoints" / "4") in message

    many = {f"layer_{i}": jax.ShapeDtypeStruct((2,), jnp.float32) for i in range(9)}
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"\.\.\. and \d+ more"):
        checkpointer.restore(many)


def test_matching_tree_with_namedtuples_and_dataclass_paths_is_not_a_mismatch(mesh8):
    state = make_state(mesh8)
    as_saved = {"params": state["params"], "step": state["step"],
                "opt_state": [{"count": state["opt_state"][0].count, "mu": state["opt_state"][0].mu,
                               "nu": state["opt_state"][0].nu}, None]}
    assert checkpointing.tree_mismatches(as_saved, abstract_of(state)) == []


@flax.struct.dataclass
class TrainStateLike:
    step: jax.Array
    params: dict
    opt_state: tuple
    target_params: dict | None  # None where a method has no target network (iCT)
    ema: dict  # empty when no EMA rates are configured
    apply_fn: object = flax.struct.field(pytree_node=False, default=None)


def test_a_dataclass_train_state_with_empty_fields_round_trips(mesh8, tmp_path, checkpointers):
    params = make_state(mesh8)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = TrainStateLike(step=jnp.asarray(3, jnp.int32), params=params, opt_state=tx.init(params),
                           target_params=None, ema={})
    checkpointers(tmp_path, async_save=False).save(3, state)
    restored, _ = checkpointers(tmp_path).restore(abstract_of(state))
    assert isinstance(restored, TrainStateLike)
    assert restored.target_params is None and restored.ema == {}
    assert_same_values(restored, state)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_non_finite_state_is_never_checkpointed(mesh8, tmp_path, checkpointers, bad_value):
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, async_save=False)
    assert checkpointer.save(1, state)
    poisoned = jax.tree.map(lambda x: x, state)
    kernel = poisoned["opt_state"][0].nu["dense"]["kernel"]
    poisoned["opt_state"][0].nu["dense"]["kernel"] = kernel.at[3, 5].set(bad_value)
    with pytest.raises(checkpointing.NonFiniteStateError) as raised:
        checkpointer.save(2, poisoned)
    message = str(raised.value)
    assert "opt_state/0/nu/dense/kernel" in message and "params/dense/kernel" not in message
    assert "step 2" in message and "latest: step 1" in message
    checkpointer.wait()
    assert checkpointer.all_steps() == [1]
    assert not (tmp_path / "checkpoints" / "2").exists()
    assert checkpointing.non_finite_leaves(state) == []
    bf16 = {"w": jnp.array([1.0, jnp.inf], jnp.bfloat16), "count": jnp.array([2**31 - 1], jnp.int32)}
    assert checkpointing.non_finite_leaves(bf16) == ["w"]


def test_a_job_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, checkpointers):
    process = subprocess.run([sys.executable, WORKER, "killed", str(tmp_path)], env=subprocess_env(),
                             capture_output=True, timeout=180)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode(errors="replace")[-3000:]
    root = tmp_path / "checkpoints"
    leftovers = [name for name in os.listdir(root) if name.startswith("2.")]
    assert leftovers and "2" not in os.listdir(root)  # killed while step 2 was being written

    checkpointer = checkpointers(tmp_path, save_every=1)
    assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
    restored, step = checkpointer.restore(abstract_of(worker.killed_state(1)))
    assert step == 1
    assert_same_values(restored, worker.killed_state(1))
    assert checkpointer.save(2, worker.killed_state(2))  # training carries on; the debris goes first
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 2] and sorted(os.listdir(root)) == ["1", "2"]


def test_sigterm_sets_a_flag_the_loop_turns_into_a_final_save(mesh8, tmp_path, checkpointers):
    before = signal.getsignal(signal.SIGTERM)
    state = make_state(mesh8)
    checkpointer = checkpointers(tmp_path, save_every=100)
    assert not checkpointer.should_stop_for_preemption(6)
    assert not checkpointer.reached_preemption(6)  # no jax.distributed: Orbax's sync point never fires
    os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it; the test process lives on
    assert checkpointer.should_stop_for_preemption(7)
    assert checkpointer.save(7, state, force=True)  # off the 100-step interval, saved anyway
    checkpointer.wait()
    assert checkpointer.latest_step() == 7
    checkpointer.close()
    assert signal.getsignal(signal.SIGTERM) == before


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, preemption):
    """Runs the worker's `distributed` mode on 2 processes x 4 devices; returns each one's RESULT line."""
    port, env = free_port(), subprocess_env()
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4"
                        " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                        " --xla_cpu_collective_timeout_seconds=600")
    processes = [
        subprocess.Popen([sys.executable, WORKER, "distributed", str(port), str(i), str(workdir), preemption],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for process in processes:
            process.kill()
    results = []
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
        results.append([line for line in log.splitlines() if line.startswith("RESULT")][-1])
    for i, result in enumerate(results):
        assert "step=40" in result and f"iterator='process={i} position={100 + i}'" in result
    assert "rows=[0]" in results[0] and "rows=[8]" in results[1]  # each process restored its own half
    return results


def test_two_processes_save_per_process_data_and_agree_on_a_sigterm_flag(tmp_path, checkpointers, mesh8):
    results = run_two_processes(tmp_path, "flag")
    # Only process 0 got SIGTERM; both stop at the same (checked) step, neither before it.
    assert all("decisions=[False, False, True]" in result for result in results)

    data_files = sorted(os.listdir(tmp_path / "checkpoints" / "40" / "data"))
    assert [f for f in data_files if f.startswith("data_process")] == [
        pipeline.state_filename(0, 2), pipeline.state_filename(1, 2)]
    # One process with 8 devices can take the 2-process state (resharded) but not its per-process data states.
    abstract = abstract_of(worker.distributed_state(mesh8))
    checkpointer = checkpointers(tmp_path, save_every=20)
    restored, step = checkpointer.restore(abstract)
    np.testing.assert_array_equal(np.asarray(restored["kernel"]),
                                  np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
    with pytest.raises(FileNotFoundError, match="process 0 of 1.*data_process_00000-of-00002"):
        checkpointer.restore(abstract, worker.CountingIterator(0))


def test_two_processes_stop_at_the_same_step_through_jax_preemption_service(tmp_path, checkpointers):
    results = run_two_processes(tmp_path, "service")
    # JAX caught process 0's SIGTERM (it survived), told process 1, and both reached one sync step.
    stop_steps = [result.split("decisions=")[1].split(" ")[0] for result in results]
    assert stop_steps[0] == stop_steps[1] and stop_steps[0] != "[]", results
    stop_step = int(stop_steps[0].strip("[]"))
    assert checkpointers(tmp_path, save_every=20).latest_step() == stop_step > 40


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    """`--workdir=workdirs/x` is what people type; Orbax refuses relative paths, so the checkpointer resolves it."""
    monkeypatch.chdir(tmp_path)
    with checkpointing.Checkpointer("relative/run", save_every=1, keep=1, async_save=False) as ckpt:
        assert ckpt.save(1, {"w": jnp.ones((4,))})
        assert os.path.isabs(str(ckpt.directory))
        restored, step = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert step == 1 and float(restored["w"].sum()) == 4.0
    assert (tmp_path / "relative" / "run" / "checkpoints" / "1").is_dir()
