"""Improved consistency training (iCT, Song & Dhariwal 2023) on class-conditional ImageNet-64.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_ict.py \
      --workdir=gs://BUCKET/runs/imagenet64_ict --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/imagenet64_ict.py --workdir=/tmp/x --mode=compile   # memory, FLOPs
  python -m cmjax.main --config=configs/imagenet64_ict.py:smoke --workdir=/tmp/in64_ict_smoke   # CPU

Settings (not confirmed against a release: iCT has no code release and its appendix was not checked here):
ADM UNet (the CM ImageNet-64 network, 295,899,267 parameters) with dropout 0.2; iCT's objective as on CIFAR-10
(target sg(θ), doubling curriculum s0 = 10 → s1 = 1280, lognormal pair indices Pm = −1.1, Ps = 2.0,
λ = 1/(σ_{i+1} − σ_i), pseudo-Huber c = 0.00054·√12288 = 0.06); evaluation EMA 0.99997; 800k steps at batch
4096; bfloat16 compute; no x-flip (not confirmed). The learning rate (1e-4, RAdam, no warm-up) is carried over
from CIFAR-10 and not checked against the paper. Two-step samples at σ = 1.526, iCT's value as the ECT
ImageNet-64 release uses it (`run_imgnet_ecm.sh:5`). Every setting with its source (or "not confirmed"):
docs/fidelity.md.

Published FID (50k samples): iCT 4.02 (1 step) / 3.20 (2 steps); iCT-deep 3.25 / 2.77.
cmjax: not yet measured. Compute: a cluster of A100 GPUs (the paper does not give the count).

`:smoke`: a tiny class-conditional MLP on the embedded digits for a few steps (configs/common.py).
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "imagenet64_ict")
    config = default.get_config()
    config.data.name = "imagenet64"
    config.data.random_flip = False
    config.model = common.adm_unet(64, dropout=0.2, num_classes=1000)
    config.method.name = "ict"
    config.method.ict.s0 = 10
    config.method.ict.s1 = 1280
    config.method.ict.p_mean = -1.1
    config.method.ict.p_std = 2.0
    config.method.ict.distance = "pseudo_huber"
    config.method.ict.weighting = "ict"
    config.batch_size = 4096
    config.total_steps = 800_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = (0.99997,)
    config.sample.two_step_sigma = 1.526
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
