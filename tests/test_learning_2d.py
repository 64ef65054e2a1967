"""Learning proof: CD from an exact Gaussian-mixture teacher samples in one step about as well as the
teacher's 35-evaluation EDM sampler (sliced Wasserstein distance to fresh data, DESIGN §4)."""
import dataclasses

import pytest

from cmjax import demo_2d, toy_problems

RING = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)


def _train_and_score(config):
    teacher = demo_2d.exact_teacher(RING, toy_problems.data_std(RING))
    model = demo_2d.train(config, RING, teacher=teacher, log=lambda s: None)
    metrics, _ = demo_2d.evaluate(model, RING, config, teacher_denoise=RING.denoise)
    return metrics


@pytest.mark.parametrize("seed", [0])
def test_cd_one_step_within_2x_of_edm_teacher(seed):
    config = dataclasses.replace(demo_2d.Demo2DConfig(), steps=2000, log_every=1000, eval_ema=0.995,
                                 eval_samples=4096, seed=seed)
    metrics = _train_and_score(config)
    print(metrics)
    assert metrics["teacher_nfe"] == 35
    # The metric separates good from bad: the teacher is near the floor, an untrained model is far off.
    # (Sliced W2 on 4,096 points is sensitive to a few far-off samples: the exact teacher scores 2–2.5×.)
    assert metrics["teacher_edm"] < 3.0 * metrics["data_floor"], metrics
    assert metrics["one_step"] < 2.0 * metrics["teacher_edm"], metrics


def test_untrained_model_fails_the_same_bar():
    config = dataclasses.replace(demo_2d.Demo2DConfig(), steps=1, log_every=1, eval_samples=4096)
    metrics = _train_and_score(config)
    assert metrics["one_step"] > 3.0 * metrics["teacher_edm"], metrics


def test_checkerboard_samples_lie_on_black_squares_with_the_stated_covariance():
    import jax
    import numpy as np

    board = toy_problems.Checkerboard(num_squares=4, half_width=1.0)
    x = np.asarray(board.sample(jax.random.key(0), 100_000))
    cells = np.floor((x + 1.0) / 0.5).astype(int)
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0) and np.all(np.abs(x) <= 1.0)
    assert len({tuple(c) for c in cells}) == 8
    np.testing.assert_allclose(np.cov(x.T), board.covariance(), atol=0.01)
    np.testing.assert_allclose(board.covariance(), [[1 / 3, 1 / 16], [1 / 16, 1 / 3]], atol=1e-12)


def test_sampling_starts_at_the_objectives_sigma_max():
    """A run trained with another σ_max samples from it: f(σmax·z, σmax), not from the default 80."""
    import jax
    import numpy as np

    from cmjax import parameterization as pz

    config = dataclasses.replace(demo_2d.Demo2DConfig(), method="ict", steps=1, log_every=1,
                                 settings=(("sigma_max", 10.0),))
    model = demo_2d.train(config, RING, log=lambda s: None)
    assert model.sigma_max == 10.0
    # With the zero-initialised output layer F = 0, so f(x, σ) = c_skip(σ)·x: the samples' std is
    # c_skip(σmax)·σmax, which tells σmax = 10 (0.050) from 80 (0.0063).
    fresh = dataclasses.replace(model, params=model.module.init(jax.random.key(0), np.zeros((1, 2)),
                                                                np.zeros((1,)))["params"])
    c_skip, _, _ = pz.consistency_scalings(10.0, model.sigma_data)
    x = demo_2d.one_step(fresh, jax.random.key(1), 20000)
    np.testing.assert_allclose(np.std(np.asarray(x)), float(c_skip) * 10.0, rtol=0.03)
    x2 = demo_2d.two_step(fresh, jax.random.key(2), 20000, middle_sigma=5.0)  # f(x1 + √(5² − σmin²)·z, 5)
    c_skip_5 = float(pz.consistency_scalings(5.0, model.sigma_data)[0])
    np.testing.assert_allclose(np.std(np.asarray(x2)), c_skip_5 * np.hypot(float(c_skip) * 10.0, 5.0), rtol=0.03)


def _meanflow_and_teacher(seed, steps):
    """MeanFlow's 1-step distance and the exact teacher's 35-evaluation EDM sampler's, same data and projections."""
    config = dataclasses.replace(demo_2d.Demo2DConfig(), method="meanflow", steps=steps, log_every=steps // 2,
                                 eval_ema=0.995, eval_samples=4096, seed=seed)
    model = demo_2d.train(config, RING, log=lambda s: None)
    metrics, _ = demo_2d.evaluate(model, RING, config, teacher_denoise=RING.denoise)
    return metrics


def test_meanflow_one_step_within_2x_of_edm_teacher():
    """MeanFlow from scratch: x = ε − u(ε, 0, 1) after 2k steps on the ring, against the exact denoiser's
    35-evaluation EDM sampler (seed 0 measured 1.18×)."""
    metrics = _meanflow_and_teacher(0, 2000)
    print(metrics)
    assert metrics["one_step"] < 2.0 * metrics["teacher_edm"], metrics


@pytest.mark.slow
def test_meanflow_one_step_within_2x_of_edm_teacher_over_seeds():
    """The same bar on the means over three seeds (measured 1.49×; seed 1 alone is 2.28×, docs/quality.md)."""
    import numpy as np

    runs = [_meanflow_and_teacher(seed, 2000) for seed in (0, 1, 2)]
    print(runs)
    one, teacher = (float(np.mean([r[k] for r in runs])) for k in ("one_step", "teacher_edm"))
    assert one < 2.0 * teacher, runs
