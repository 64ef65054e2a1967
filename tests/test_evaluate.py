"""Evaluation at scale: deterministic per-sample noise, chunked and resumable scoring, --mode=eval/sample outputs,
the 2-step ternary search, and a 2-process evaluation equal to the 1-process one.

The model is a tiny MLP trained 2 steps on the embedded digits; the Inception is the real architecture with random
weights at a 75-pixel input (the smallest it accepts) to keep the CPU time low.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import evaluate, sharding, train
from cmjax import workdir as workdir_lib
from cmjax.metrics import inception
from configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SAMPLES = 40  # 3 chunks of 16: the last one partial
WORKER_TIMEOUT = 900


def small_config(data_dir, weights):
    config = digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.model = digits.get_config().model
    config.model.hidden_dim, config.model.num_layers, config.model.time_embed_dim = 32, 1, 16
    config.total_steps, config.ckpt_every, config.log_every = 2, 2, 1
    config.eval.update(metric="inception", inception_size=inception.MIN_INPUT_SIZE, reference="test[:48]",
                       batch_size=16, num_samples=NUM_SAMPLES, inception_weights=weights)
    return config


def random_inception_variables(seed=0):
    """He-scaled random convolutions and batch-norm variances (means and shifts 0), so that pool features of
    different images stay distinct through the depth (Flax's default init lets them decay to ~0)."""
    size = inception.MIN_INPUT_SIZE
    variables = jax.eval_shape(lambda: inception.FIDInception(size).init(jax.random.key(0),
                                                                         jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = "/".join(str(k.key) for k in path)
        if name.endswith("conv/kernel"):
            return rng.normal(size=x.shape) * np.sqrt(2.0 / np.prod(x.shape[:3]))
        if name.endswith("var"):
            return rng.uniform(0.5, 1.5, x.shape)
        if name.endswith("scale"):
            return rng.uniform(0.6, 1.4, x.shape)
        if name.endswith("fc/kernel"):
            return rng.normal(size=x.shape) * 0.5 / np.sqrt(x.shape[0])
        return np.zeros(x.shape)

    return jax.tree_util.tree_map_with_path(leaf, dict(variables))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step checkpoint and random FID-Inception weights (saved in the converted .npz format)."""
    root = tmp_path_factory.mktemp("evaluate")
    weights = str(root / "inception_random.npz")
    inception.save_variables(random_inception_variables(), weights)
    config = small_config(str(root / "tfds"), weights)
    workdir = str(root / "workdir")
    train.train_and_evaluate(config, workdir)
    return {"root": root, "config": config, "workdir": workdir}


@pytest.fixture(scope="module")
def evaluator(run):
    """(Evaluator, params) of the checkpoint: compiled samplers and the Inception shared by the tests below."""
    config = run["config"]
    mesh = sharding.make_mesh(config.mesh)
    module, params, _, _ = workdir_lib.load_params(run["workdir"], mesh, config=config)
    return evaluate.Evaluator(config, module, mesh), params


@pytest.fixture(scope="module")
def one_process(run):
    output = str(run["root"] / "eval_1process")
    metrics = evaluate.evaluate_checkpoint(run["config"], run["workdir"], output=output)
    samples = evaluate.sample_checkpoint(run["config"], run["workdir"], num_samples=24,
                                         output=str(run["root"] / "samples_1process"))
    return {"metrics": metrics, "samples": samples, "output": output}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes_started(run):
    """Two processes x 4 devices evaluating the same checkpoint, each a `tests/_eval_worker.py`."""
    output = str(run["root"] / "eval_2process")
    os.makedirs(output)
    config_path = str(run["root"] / "config.json")
    config = run["config"].copy_and_resolve_references()
    # The same 48 images under another cache key: the two processes compute the reference statistics together.
    config.eval.reference = "test[0:48]"
    with open(config_path, "w") as f:
        f.write(config.to_json())
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    port = free_port()
    logs = [open(os.path.join(output, f"log_{i}.txt"), "wb") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_eval_worker.py"), config_path,
                               run["workdir"], str(port), str(i), output], env=env, cwd=ROOT, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    yield {"procs": procs, "output": output, "logs": logs}
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def test_ternary_search_finds_the_minimum_of_a_unimodal_score():
    calls = []

    def score(i):
        calls.append(i)
        return (i - 17) ** 2 + 0.5 * abs(i - 17)

    best, scores = evaluate.ternary_search(score, 1, 38)
    assert best == 17 and scores[17] == 0
    assert len(set(calls)) == len(calls) < 20  # memoised, and far fewer than the 38 candidates
    for target in (1, 2, 37, 38):
        assert evaluate.ternary_search(lambda i: abs(i - target), 1, 38)[0] == target


def test_samples_depend_only_on_seed_and_index(run, evaluator):
    config = run["config"]
    evaluator, params = evaluator
    key = evaluate.eval_key(config.seed)
    many = evaluator.samples(params, [80.0, 0.8], 40, key)  # chunks of 16
    few = evaluator.samples(params, [80.0, 0.8], 8, key)  # one chunk of 8
    np.testing.assert_array_equal(few["image"], many["image"][:8])
    assert many["image"].dtype == np.uint8 and many["image"].shape == (40, 8, 8, 1)
    assert len({im.tobytes() for im in many["image"]}) == 40  # distinct noise per sample
    other_seed = evaluator.samples(params, [80.0, 0.8], 8, evaluate.eval_key(config.seed + 1))
    assert not np.array_equal(other_seed["image"], few["image"])


def test_eval_writes_metrics_and_grids(run, one_process):
    metrics, output = one_process["metrics"], one_process["output"]
    assert metrics["step"] == 2 and metrics["num_samples"] == NUM_SAMPLES and metrics["metric"] == "inception"
    assert metrics["fid_protocol"] == "tf_legacy" and metrics["quantize"] == "round"  # the report names them
    for sampler in ("1step", "2step"):
        tag = f"ema0.999_{sampler}"
        assert metrics[f"{tag}/fid"] > 0 and np.isfinite(metrics[f"{tag}/fid"])
        assert 1.0 <= metrics[f"{tag}/inception_score"] <= 1008
        assert 0.0 <= metrics[f"{tag}/precision"] <= 1.0 and 0.0 <= metrics[f"{tag}/recall"] <= 1.0
        assert os.path.exists(os.path.join(output, f"{tag}_00000002.png"))
    with open(os.path.join(output, "metrics_00000002.json")) as f:
        assert json.load(f) == metrics
    assert not os.path.exists(os.path.join(output, "chunks_00000002"))  # features removed once scored
    samples = one_process["samples"]
    with np.load(samples["1step_samples"]) as stored:
        assert stored["images"].shape == (24, 8, 8, 1) and stored["images"].dtype == np.uint8
        assert stored["labels"].shape == (24,)
    assert os.path.exists(samples["2step_grid"])


def test_reference_features_against_themselves_give_zero_fid(evaluator, one_process):
    """FID of the reference set's own features against its statistics is 0 (and the cache file is reused)."""
    from cmjax.metrics import fid

    reference = evaluator[0].metric().reference()  # from the cache written by the evaluation
    assert reference["features"].shape == (48, inception.FEATURE_DIM)
    stats = fid.FeatureStatistics(inception.FEATURE_DIM).update(reference["features"])
    assert fid.fid_from_statistics(stats, reference["mu"], reference["sigma"]) == pytest.approx(0.0, abs=1e-6)


def test_preempted_scoring_resumes_at_the_next_chunk(run, evaluator, tmp_path):
    config = run["config"]
    evaluator, params = evaluator
    metric = evaluator.metric()
    key, chunk_dir, sigmas = evaluate.eval_key(config.seed), str(tmp_path / "chunks"), [80.0]
    full = evaluator.score(params, sigmas, NUM_SAMPLES, key, metric, chunk_dir)
    chunks = sorted(os.listdir(chunk_dir))
    assert chunks == ["chunk_000000000_000000016.npz", "chunk_000000016_000000032.npz",
                      "chunk_000000032_000000040.npz"]
    os.remove(os.path.join(chunk_dir, chunks[-1]))  # preempted before the last chunk was saved
    sampled = []
    run_fn = evaluator.sampler(sigmas, 16)
    evaluator._samplers[(80.0,), 16] = lambda p, k, start: sampled.append(int(start)) or run_fn(p, k, start)
    try:
        resumed = evaluator.score(params, sigmas, NUM_SAMPLES, key, metric, chunk_dir)
    finally:
        evaluator._samplers[(80.0,), 16] = run_fn
    assert sampled == [32]
    assert resumed == full


@pytest.mark.slow  # 3 minutes on 2 cores at load 20 (a sampler compile per probed middle time)
def test_two_step_search_scores_middle_times_and_picks_the_best(evaluator):
    from cmjax import sampling

    evaluator, params = evaluator
    metric = evaluator.metric()
    search = evaluator.two_step_search(params, 16, metric, steps=5)  # middle index i in [1, 3]
    scores = {int(i): v for i, v in search["evaluated"].items()}
    assert sorted(scores) == [1, 2, 3]
    assert search["best_index"] == min(scores, key=scores.get) and search["best_fid"] == min(scores.values())
    # The grid spans the run's own σ range (configs/digits.py: σ_max = 10).
    assert evaluator.sigma_max == 10.0
    assert search["best_sigma"] == pytest.approx(float(sampling.openai_ts_sigmas(
        [0, search["best_index"], 4], 5, evaluator.sigma_min, evaluator.sigma_max)[1]))
    # Each probe is the FID of the 2-step sampler at that middle time on the search's own samples.
    i = search["best_index"]
    again = evaluator.score(params, [evaluator.sigma_max, search["best_sigma"]], 16,
                            evaluate.eval_key(evaluator.config.seed, evaluate.SEARCH_STREAM), metric)
    assert again["fid"] == pytest.approx(scores[i], rel=1e-9)


@pytest.mark.slow  # 3-5.4 minutes on 2 cores at load 17-27 (two processes compile the samplers and the Inception)
@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_numbers(run, one_process, two_processes_started):
    started = two_processes_started
    for i, proc in enumerate(started["procs"]):
        try:
            proc.wait(timeout=WORKER_TIMEOUT)
        finally:
            started["logs"][i].close()
        with open(os.path.join(started["output"], f"log_{i}.txt"), errors="replace") as f:
            log = f.read()
        assert proc.returncode == 0, f"process {i} exit {proc.returncode}:\n{log[-4000:]}"
    results = []
    for i in range(2):
        with open(os.path.join(started["output"], f"result_{i}.json")) as f:
            results.append(json.load(f))
    assert [r["process_count"] for r in results] == [2, 2] and results[0]["device_count"] == 8
    assert results[0]["metrics"] == results[1]["metrics"]  # every process returns the same numbers
    expected = one_process["metrics"]
    got = results[0]["metrics"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    for sampler in ("1step", "2step"):
        with np.load(results[0]["samples"][f"{sampler}_samples"]) as two, \
                np.load(one_process["samples"][f"{sampler}_samples"]) as one:
            np.testing.assert_array_equal(two["images"], one["images"])


def test_ect_is_sampled_as_its_release_samples():
    """ECT's release evaluates its EDM-trained network with the boundary scalings at σmin = 0.003 and renoises
    with x + τ·z without clipping between steps (cmjax/methods.py): the Evaluator's samples are that, computed
    here directly from the network, sample i from fold_in(key, i), then rounded to uint8."""
    from cmjax import methods, models, parameterization
    from configs import cifar10_ect

    config = cifar10_ect.get_config("smoke")  # a tiny MLP on digits; no training needed for the sampler
    mesh = sharding.make_mesh(config.mesh)
    module = models.get(config.model)
    params = models.init_params(module, config, jax.random.key(1))
    evaluator = evaluate.Evaluator(config, module, mesh)
    assert (evaluator.kind, evaluator.sigma_min, evaluator.renoise, evaluator.clip) == (
        "consistency", 0.003, "plain", False)
    key, sigmas = jax.random.key(3), [80.0, 0.821]
    images, _ = evaluator.sampler(sigmas, 8)(params, key, 0)

    apply_fn = lambda p, x, t: module.apply({"params": p}, x, t, None, train=False)  # noqa: E731
    f = lambda x, s: parameterization.consistency_denoise(apply_fn, params, x, jnp.full((1,), s),  # noqa: E731
                                                          sigma_min=0.003)
    expected = []
    for i in range(8):
        _, noise_key = jax.random.split(jax.random.fold_in(key, i))
        z = [jax.random.normal(jax.random.fold_in(noise_key, j), (1, 8, 8, 1)) for j in range(2)]
        x = f(f(80.0 * z[0], 80.0) + 0.821 * z[1], 0.821)
        expected.append(np.clip(np.round((np.asarray(x[0]) + 1.0) * 127.5), 0, 255))
    np.testing.assert_allclose(np.asarray(images, np.float64), np.stack(expected), atol=1.0)
    assert np.mean(np.asarray(images, np.float64) == np.stack(expected)) > 0.99
    # Other methods keep CM Algorithm 1 (boundary scalings at the training σmin, √(τ² − σmin²), clipped).
    config.method.name = "ict"
    assert methods.sampler_settings(config) == {"parameterization": "consistency", "sigma_min": 0.002,
                                                "sigma_max": 80.0, "sigma_data": 0.5, "renoise": "cm",
                                                "clip": True, "guidance": None}


def test_quantisation_is_a_protocol_choice():
    """round((x+1)·127.5) (ECT's (x·127.5 + 128) truncated, up to halves) or the CM releases' truncation."""
    x = jnp.asarray([-1.5, -1.0, -0.999, 0.0, 0.4999, 0.999, 1.0, 1.2])
    np.testing.assert_array_equal(evaluate.quantize(x, "round"), [0, 0, 0, 128, 191, 255, 255, 255])
    np.testing.assert_array_equal(evaluate.quantize(x, "floor"), [0, 0, 0, 127, 191, 254, 255, 255])
    with pytest.raises(ValueError, match="config.sample.quantize"):
        evaluate.quantize(x, "nearest")
