"""Improved consistency training (iCT, Song & Dhariwal 2023) on class-conditional ImageNet-64.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_ict.py \
      --workdir=gs://BUCKET/runs/imagenet64_ict --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/imagenet64_ict.py --workdir=/tmp/x --mode=compile   # memory, FLOPs
  python -m cmjax.main --config=configs/imagenet64_ict.py:smoke --workdir=/tmp/in64_ict_smoke   # CPU

Settings: ADM UNet (the CM ImageNet-64 network, 295,899,267 parameters) with dropout 0.2; iCT's objective
as on CIFAR-10 (target sg(θ), doubling curriculum s0 = 10 → s1 = 1280, lognormal pair indices Pm = −1.1,
Ps = 2.0, λ = 1/(σ_{i+1} − σ_i), pseudo-Huber c = 0.00054·√12288 = 0.06); evaluation EMA 0.99997;
800k steps at batch 4096; bfloat16 compute. The learning rate (1e-4, RAdam) is carried over from CIFAR-10
and not checked against the paper.

Published FID (50k samples): iCT 4.02 (1 step) / 3.20 (2 steps); iCT-deep 3.25 / 2.77.
cmjax: not yet measured. Compute: a cluster of A100 GPUs (the paper does not give the count).

`:smoke`: a tiny class-conditional MLP on the embedded digits for a few steps (configs/common.py).
"""
from configs import common


def get_config(arg: str | None = None):
    return common.recipe(
        common.variants(arg, ("smoke",), "imagenet64_ict"), data="imagenet64",
        model=common.adm_unet(64, dropout=0.2, num_classes=1000), method=common.ict_method(),
        batch_size=4096, total_steps=800_000, optimizer="radam", learning_rate=1e-4, ema_rates=(0.99997,),
        ckpt_every=5_000)
