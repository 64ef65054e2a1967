"""Improved consistency training (iCT, Song & Dhariwal 2023) on CIFAR-10: no teacher, no LPIPS.
Variant `:deep` is iCT-deep (twice the residual blocks per resolution); add `,smoke` for a CPU run.

  python -m cmjax.main --config=configs/cifar10_ict.py --workdir=gs://BUCKET/runs/cifar10_ict
  python -m cmjax.main --config=configs/cifar10_ict.py:smoke --workdir=/tmp/ict_smoke   # CPU, no download

Settings (iCT paper as summarised in DESIGN §4; iCT has no code release and its appendix was not checked here,
so these are not confirmed against a release): NCSN++ with dropout 0.3 and Fourier scale 0.02, target sg(θ)
(no target EMA), doubling curriculum s0 = 10 → s1 = 1280 (N = 11, 21, …, 1281) over K = 400k steps,
lognormal pair indices (Pm = −1.1, Ps = 2.0), λ = 1/(σ_{i+1} − σ_i), pseudo-Huber c = 0.00054·√3072 = 0.03,
RAdam lr 1e-4, no warm-up, batch 1024, 400k steps, evaluation EMA 0.99993, random flips. Two-step samples at
σ = 0.821, iCT's value as carried by the ECT release (`ct_train.py:99`) and NVIDIA FastGen. Every setting with
its source (or "not confirmed"): docs/fidelity.md.

Published FID (50k samples): iCT 2.83 (1 step) / 2.46 (2 steps); iCT-deep 2.51 / 2.24.
cmjax: not yet measured. Compute: a cluster of A100 GPUs (the paper does not give the count).

`:smoke`: a tiny MLP on the embedded digits for a few steps (configs/common.py).
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("deep", "smoke"), "cifar10_ict")
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model = common.ncsnpp_cifar10(dropout=0.3, fourier_scale=0.02)
    if "deep" in chosen:
        config.model.num_res_blocks = 8
    config.method.name = "ict"
    config.method.ict.s0 = 10
    config.method.ict.s1 = 1280
    config.method.ict.p_mean = -1.1
    config.method.ict.p_std = 2.0
    config.method.ict.distance = "pseudo_huber"
    config.method.ict.weighting = "ict"
    config.batch_size = 1024
    config.total_steps = 400_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = (0.99993,)
    config.sample.two_step_sigma = 0.821
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
