"""Consistency distillation (CM 2023) on class-conditional ImageNet-64 from the imagenet64_edm teacher.
Variants `:lpips` (the default, the published headline) and `:l2` (the release's cd_imagenet64_l2);
add `,smoke` for a CPU run.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_cd.py:lpips \
      --workdir=gs://BUCKET/runs/imagenet64_cd --data-dir=gs://BUCKET/tensorflow_datasets \
      -- --config.teacher.workdir=gs://BUCKET/runs/imagenet64_edm
  python -m cmjax.main --config=configs/imagenet64_cd.py:l2,smoke --workdir=/tmp/in64_cd_smoke \
      --config.teacher.workdir=/tmp/imagenet64_edm_smoke     # an imagenet64_edm.py:smoke workdir

Settings of the CM release (`scripts/launch.sh`, L_CD^N): the student, its target and EMAs start from the
teacher's EMA copy (`cm_train.py:75-115`; `--config.teacher.init_student=False` starts fresh), the EMA copy
0.9999432 (the likely rate of openai's `edm_imagenet64_ema.pt`: an inference, not confirmed); ADM UNet as the
teacher's (dropout 0), N = 40 fixed, target EMA μ = 0.95, Heun teacher step, uniform weighting, LPIPS with VGG
average pooling (piq `replace_pooling=True`; 64 px upsampled to 224) or L2, RAdam lr 8e-6 constant (no
warm-up), batch 2048, 600k steps, EMA rates 0.999 / 0.9999 / 0.9999432, random flips, fp16 (bfloat16 here).
Two-step samples use openai's `--ts 0,22,39 --steps 40` (second σ = 1.382). Samples are quantised by
truncation and scored with the TF1 Inception resize (the ADM evaluator). The released `:l2` command trains
with LPIPS (its `--loss_norm` is never passed on); cmjax's `:l2` is the intended L2. Every setting with its
source line: docs/fidelity.md.

Published FID (50k samples), CD-LPIPS: 6.20 (1 step) / 4.70 (2 steps). cmjax: not yet measured.
Compute: 64 A100 GPUs (CM paper, Table 3).

`:smoke`: a tiny class-conditional MLP on the embedded digits for a few steps; the teacher must be an
imagenet64_edm.py:smoke run. `:lpips` needs the LPIPS VGG weights (cmjax.metrics.lpips).
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("lpips", "l2", "smoke"), "imagenet64_cd")
    config = default.get_config()
    config.data.name = "imagenet64"
    config.data.random_flip = True  # the release's loader flips by default
    config.model = common.adm_unet(64, dropout=0.0, num_classes=1000)
    config.method.name = "cd"
    config.method.cd.teacher_solver = "heun"
    config.method.cd.curriculum = "fixed"
    config.method.cd.num_scales = 40
    config.method.cd.target_ema = 0.95
    config.method.cd.distance = common.lpips_or_l2(chosen, "imagenet64_cd", lpips="lpips_avgpool")
    config.teacher.ema_rate = common.CM_TEACHER_EMA_RATE
    config.method.cd.weighting = "uniform"
    config.batch_size = 2048
    config.total_steps = 600_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 8e-6
    config.ema_rates = common.CM_EMA_RATES_IMAGENET
    config.sample.two_step_sigma = common.openai_ts_sigma(22, 40)
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
