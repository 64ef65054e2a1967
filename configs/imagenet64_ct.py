"""Consistency training (CM 2023, adaptive curriculum) on class-conditional ImageNet-64: no teacher. Variant
`:init_teacher` starts from the imagenet64_edm teacher's weights, as the release's command does; add `,smoke`
for a CPU run.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_ct.py \
      --workdir=gs://BUCKET/runs/imagenet64_ct --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/imagenet64_ct.py:init_teacher --workdir=gs://BUCKET/runs/imagenet64_ct \
      --config.teacher.workdir=gs://BUCKET/runs/imagenet64_edm
  python -m cmjax.main --config=configs/imagenet64_ct.py:smoke --workdir=/tmp/in64_ct_smoke   # CPU

Settings of the CM release (`scripts/launch.sh:38`, L_CT^N): ADM UNet (dropout 0), adaptive curriculum
s0 = 2 → s1 = 200 with μ0 = 0.95 over K = 800k steps, uniform weighting, LPIPS with VGG average pooling (piq
`replace_pooling=True`, 64 px upsampled to 224), RAdam lr 1e-4 constant (no warm-up; the release's command,
the paper's table lists a smaller one), batch 2048, 800k steps, EMA rates 0.999 / 0.9999 / 0.9999432, random
flips, fp16 (bfloat16 here). Two-step samples: `--ts 0,106,200 --steps 201`. Samples are quantised by
truncation and scored with the TF1 Inception resize (the ADM evaluator).
Initialisation: the paper trains CT without a pre-trained model (the default here, a fresh init), but the
released command passes `--teacher_model_path edm_imagenet64_ema.pt`, and `cm_train.py:75-92` copies it into the
student, target and EMAs for every training mode. Which of the two produced `ct_imagenet64.pt` is not
confirmed; `:init_teacher` reproduces the command (the teacher's EMA copy 0.9999432, an inference). Every
setting with its source line: docs/fidelity.md.

Published FID (50k samples): 13.0 (1 step) / 11.1 (2 steps). cmjax: not yet measured.
Compute: 64 A100 GPUs (CM paper, Table 3).

`:smoke`: a tiny class-conditional MLP on the embedded digits for a few steps. The LPIPS distance needs the
LPIPS VGG weights (cmjax.metrics.lpips); `--config.method.ct.distance=l2` runs without them.
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("init_teacher", "smoke"), "imagenet64_ct")
    config = default.get_config()
    config.data.name = "imagenet64"
    config.data.random_flip = True  # the release's loader flips by default
    config.model = common.adm_unet(64, dropout=0.0, num_classes=1000)
    config.method.name = "ct"
    config.method.ct.curriculum = "cm_adaptive"
    config.method.ct.s0 = 2
    config.method.ct.s1 = 200
    config.method.ct.mu0 = 0.95
    config.method.ct.distance = "lpips_avgpool"
    config.method.ct.weighting = "uniform"
    if "init_teacher" in chosen:
        config.teacher.init_student = True
        config.teacher.ema_rate = common.CM_TEACHER_EMA_RATE
    config.batch_size = 2048
    config.total_steps = 800_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = common.CM_EMA_RATES_IMAGENET
    config.sample.two_step_sigma = common.openai_ts_sigma(106, 201)
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
