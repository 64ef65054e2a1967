"""Consistency training (CM 2023, adaptive curriculum) on LSUN Bedroom-256: no teacher.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/lsun_bedroom256_ct.py \
      --workdir=gs://BUCKET/runs/bedroom_ct --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/lsun_bedroom256_ct.py:smoke --workdir=/tmp/bedroom_ct_smoke   # CPU

Settings of the CM release (`scripts/launch.sh`, L_CT^N on LSUN 256): ADM UNet (dropout 0), adaptive
curriculum s0 = 2 → s1 = 150 with μ0 = 0.95 over K = 1M steps, uniform weighting, LPIPS distance,
lr 5e-5, batch 256 (the release's command), 1M steps, EMA rates 0.9999 / 0.99994 / 0.9999432, fp16
(bfloat16 here). Two-step samples: `--ts 0,67,150 --steps 151`.

Published FID (50k samples): 16.0 (1 step) / 7.85 (2 steps). cmjax: not yet measured.
Compute: 64 A100 GPUs (CM paper, Table 3).

`:smoke`: a tiny unconditional MLP on the embedded digits for a few steps. The LPIPS distance needs the
LPIPS VGG weights (cmjax.metrics.lpips); `--config.method.distance=l2` runs without them.
"""
from configs import common


def get_config(arg: str | None = None):
    return common.recipe(
        common.variants(arg, ("smoke",), "lsun_bedroom256_ct"), data="lsun_bedroom",
        model=common.adm_unet(256, dropout=0.0, num_classes=0),
        method=common.method("ct", curriculum="cm_adaptive", s0=2, s1=150, mu0=0.95, distance="lpips",
                             weighting="uniform"),
        batch_size=256, total_steps=1_000_000, optimizer="radam", learning_rate=5e-5,
        ema_rates=common.CM_EMA_RATES_LSUN, two_step_sigma=common.openai_ts_sigma(67, 151), ckpt_every=5_000)
