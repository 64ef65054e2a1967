"""Consistency training (CM 2023, adaptive curriculum) on LSUN Bedroom-256: no teacher. Variant
`:init_teacher` starts from the lsun_bedroom256_edm teacher's weights, as the release's command does; add
`,smoke` for a CPU run.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/lsun_bedroom256_ct.py \
      --workdir=gs://BUCKET/runs/bedroom_ct --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/lsun_bedroom256_ct.py:init_teacher --workdir=gs://BUCKET/runs/bedroom_ct \
      --config.teacher.workdir=gs://BUCKET/runs/bedroom_edm
  python -m cmjax.main --config=configs/lsun_bedroom256_ct.py:smoke --workdir=/tmp/bedroom_ct_smoke   # CPU

Settings of the CM release (`scripts/launch.sh:41`, L_CT^N on LSUN 256): ADM UNet (dropout 0), adaptive
curriculum s0 = 2 → s1 = 150 with μ0 = 0.95 over K = 1M steps, uniform weighting, LPIPS with VGG average
pooling at the native 256 px (no resize), RAdam lr 5e-5 constant (no warm-up), batch 256 (the release's
command), 1M steps, EMA rates 0.9999 / 0.99994 / 0.9999432, random flips, fp16 (bfloat16 here). Two-step
samples: `--ts 0,67,150 --steps 151`. Samples are quantised by truncation and scored with the TF1 Inception
resize (the ADM evaluator).
Initialisation: the paper trains CT without a pre-trained model (the default here), but the released command
passes `--teacher_model_path edm_bedroom256_ema.pt`, which `cm_train.py:75-92` copies into the student, target
and EMAs. Which produced `ct_bedroom256.pt` is not confirmed; `:init_teacher` reproduces the command. Every
setting with its source line: docs/fidelity.md.

Published FID (50k samples): 16.0 (1 step) / 7.85 (2 steps). cmjax: not yet measured.
Compute: 64 A100 GPUs (CM paper, Table 3).

`:smoke`: a tiny unconditional MLP on the embedded digits for a few steps. The LPIPS distance needs the
LPIPS VGG weights (cmjax.metrics.lpips); `--config.method.ct.distance=l2` runs without them.
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("init_teacher", "smoke"), "lsun_bedroom256_ct")
    config = default.get_config()
    config.data.name = "lsun_bedroom"
    config.data.random_flip = True  # the release's loader flips by default
    config.model = common.adm_unet(256, dropout=0.0, num_classes=0)
    config.method.name = "ct"
    config.method.ct.curriculum = "cm_adaptive"
    config.method.ct.s0 = 2
    config.method.ct.s1 = 150
    config.method.ct.mu0 = 0.95
    config.method.ct.distance = "lpips_avgpool"
    config.method.ct.weighting = "uniform"
    if "init_teacher" in chosen:
        config.teacher.init_student = True
        config.teacher.ema_rate = common.CM_TEACHER_EMA_RATE
    config.batch_size = 256
    config.total_steps = 1_000_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 5e-5
    config.ema_rates = common.CM_EMA_RATES_LSUN
    config.sample.two_step_sigma = common.openai_ts_sigma(67, 151)
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
