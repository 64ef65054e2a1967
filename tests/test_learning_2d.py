"""Learning proof: CD from an exact Gaussian-mixture teacher samples in one step about as well as the
teacher's 35-evaluation EDM sampler (sliced Wasserstein distance to fresh data, DESIGN §4)."""
import dataclasses

import pytest

from cmjax import demo_2d, toy_problems


@pytest.mark.parametrize("seed", [0])
def test_cd_one_step_within_2x_of_edm_teacher(seed):
    config = dataclasses.replace(demo_2d.Demo2DConfig(), steps=2000, log_every=1000, eval_ema=0.995,
                                 eval_samples=4096, seed=seed)
    mixture = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)
    module, params, sigma_data = demo_2d.train_cd(config, mixture, log=lambda s: None)
    metrics, _ = demo_2d.evaluate(module, params, mixture, sigma_data, config)
    print(metrics)
    assert metrics["teacher_nfe"] == 35
    # The metric separates good from bad: the teacher is near the floor, an untrained model is far off.
    assert metrics["teacher_edm"] < 2.5 * metrics["data_floor"]
    assert metrics["one_step"] < 2.0 * metrics["teacher_edm"], metrics


def test_untrained_model_fails_the_same_bar():
    config = dataclasses.replace(demo_2d.Demo2DConfig(), steps=1, log_every=1, eval_samples=4096)
    mixture = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)
    module, params, sigma_data = demo_2d.train_cd(config, mixture, log=lambda s: None)
    metrics, _ = demo_2d.evaluate(module, params, mixture, sigma_data, config)
    assert metrics["one_step"] > 3.0 * metrics["teacher_edm"], metrics
