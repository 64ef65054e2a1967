"""Fast regression guard of `bench/quality.py` (docs/quality.md): on the 8-Gaussian ring, an EDM MLP teacher,
CD distilled from it and iCT trained from scratch, all through `cmjax.losses` objectives and the library's
samplers, must reach the distances the full bench shows (with margins a broken objective misses)."""
import dataclasses

import jax
import pytest

from cmjax import demo_2d, toy_problems

RING = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)
NUM = 4096
BASE = demo_2d.Demo2DConfig(steps=1200, log_every=600, eval_ema=0.995, eval_samples=NUM)


@pytest.fixture(scope="module")
def scorer():
    return demo_2d.Scorer(RING, jax.random.key(123), NUM)


@pytest.fixture(scope="module")
def edm(scorer):
    model = demo_2d.train(dataclasses.replace(BASE, method="edm"), RING, log=lambda s: None)
    samples, nfe = demo_2d.edm_sample(model.denoiser(), jax.random.key(1), NUM)
    assert nfe == 35
    return model, scorer(samples)


def _scores(model, scorer, middle_sigma):
    return (scorer(demo_2d.one_step(model, jax.random.key(2), NUM)),
            scorer(demo_2d.two_step(model, jax.random.key(3), NUM, middle_sigma)))


def test_edm_teacher_is_near_the_floor(edm, scorer):
    _, teacher = edm
    assert teacher < 3.0 * scorer.floor(), (teacher, scorer.floor())


def test_cd_from_the_edm_teacher_samples_in_one_step_within_2x(edm, scorer):
    teacher_model, teacher = edm
    model = demo_2d.train(dataclasses.replace(BASE, method="cd"), RING, log=lambda s: None,
                          teacher=demo_2d.model_teacher(teacher_model))
    one, two = _scores(model, scorer, middle_sigma=0.1)
    print({"teacher": teacher, "cd_one_step": one, "cd_two_step": two})
    assert one < 2.0 * teacher, (one, teacher)
    assert two < 2.0 * teacher, (two, teacher)


def test_ict_learns_and_two_steps_beat_one(edm, scorer):
    _, teacher = edm
    model = demo_2d.train(dataclasses.replace(BASE, method="ict"), RING, log=lambda s: None)
    one, two = _scores(model, scorer, middle_sigma=0.8)
    print({"teacher": teacher, "ict_one_step": one, "ict_two_step": two})
    assert one < 6.0 * teacher, (one, teacher)  # an untrained or wrongly-targeted model is ~20× off
    assert two < one, (two, one)
