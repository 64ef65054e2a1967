"""EDM teacher on CIFAR-10 (unconditional, 32×32): the diffusion model that CD distils and ECT tunes.

  python -m cmjax.main --config=configs/cifar10_edm.py --workdir=gs://BUCKET/runs/cifar10_edm
  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/cifar10_edm.py --workdir=gs://BUCKET/runs/cifar10_edm
  python -m cmjax.main --config=configs/cifar10_edm.py:smoke --workdir=/tmp/cifar10_edm_smoke   # CPU, no download

Settings of the CM CIFAR-10 release's teacher (`configs/cifar10_k_ve.py` of openai/consistency_models_cifar10):
NCSN++ (56,395,651 parameters, Fourier scale 16, dropout 0.13), EDM denoising score matching with
ln σ ~ N(−1.2, 1.2²), Adam lr 1e-3 with a 10M-image linear warm-up (19,531 steps; the release's Adam branch
uses it), then constant, no clipping, batch 512, 400k steps, EMA half-life 0.5M images (rate 0.99929 at
batch 512), random flips, float32. Samples are quantised by truncation, as the release's evaluate.py.
Difference: the release sums the loss over pixels, cmjax takes the mean (equal under Adam up to eps).
Every setting with its source line: docs/fidelity.md.

Published: FID 2.04 with the 35-evaluation EDM sampler (the CM paper's EDM row, DESIGN §4; the release itself
states no number). cmjax: not yet measured. Compute: the release does not state it for the teacher.

`:smoke` keeps the method and optimizer but trains a tiny MLP on the embedded digits dataset for a few steps
(configs/common.py); its workdir is the teacher for the CD/ECT smoke runs.
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "cifar10_edm")
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model = common.ncsnpp_cifar10(dropout=0.13)
    config.method.name = "edm"
    config.method.edm.p_mean = -1.2
    config.method.edm.p_std = 1.2
    config.batch_size = 512
    config.total_steps = 400_000
    config.optim.optimizer = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 19_531  # 10M images
    config.ema_rates = (common.ema_rate_from_half_life(0.5e6, 512),)
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
