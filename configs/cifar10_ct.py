"""Consistency training (CM 2023, adaptive curriculum) on CIFAR-10: no teacher.

  python -m cmjax.main --config=configs/cifar10_ct.py --workdir=gs://BUCKET/runs/cifar10_ct
  python -m cmjax.main --config=configs/cifar10_ct.py:smoke --workdir=/tmp/ct_smoke   # CPU, no download

Settings of the CM CIFAR-10 release (`configs/cifar10_ve_ct_adaptive.py`): NCSN++ (dropout 0), adaptive
curriculum N(k) from s0 = 2 to s1 = 150 with μ0 = 0.9 over K = 800k steps (the released code's form,
DESIGN §4), x̂_n = x + σ_n·z, uniform weighting, LPIPS distance, RAdam lr 2e-4 with a 10M-image warmup
(19,531 steps), batch 512, evaluation EMA 0.9999.

Published FID (50k samples): 8.70 (1 step) / 5.83 (2 steps). cmjax: not yet measured.
Compute: 8 A100 GPUs (CM paper, Table 3).

`:smoke`: a tiny MLP on the embedded digits for a few steps. The LPIPS distance needs the LPIPS VGG weights
(cmjax.metrics.lpips); `--config.method.distance=l2` runs without them.
"""
from configs import common


def get_config(arg: str | None = None):
    return common.recipe(
        common.variants(arg, ("smoke",), "cifar10_ct"), data="cifar10", random_flip=True,
        model=common.ncsnpp_cifar10(dropout=0.0),
        method=common.method("ct", curriculum="cm_adaptive", s0=2, s1=150, mu0=0.9, distance="lpips",
                             weighting="uniform"),
        batch_size=512, total_steps=800_000, optimizer="radam", learning_rate=2e-4, warmup_steps=19_531,
        ema_rates=(0.9999,))
