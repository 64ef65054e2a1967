"""Consistency distillation (CM 2023) on CIFAR-10 from the cifar10_edm teacher. Variants `:lpips` (the
default, the published one) and `:l2`; add `,smoke` for a CPU run.

  python -m cmjax.main --config=configs/cifar10_cd.py:lpips --workdir=gs://BUCKET/runs/cifar10_cd \
      --config.teacher.workdir=gs://BUCKET/runs/cifar10_edm
  python -m cmjax.main --config=configs/cifar10_cd.py:l2,smoke --workdir=/tmp/cd_smoke \
      --config.teacher.workdir=/tmp/cifar10_edm_smoke     # a cifar10_edm.py:smoke workdir

Settings of the CM CIFAR-10 release (`configs/cifar10_ve_cd.py`, `launch.sh`): the student starts from the
teacher (`finetune=True`: its online network from the teacher's online parameters, its EMA from the teacher's
EMA; `--config.teacher.init_student=False` starts fresh), NCSN++ (dropout 0), N = 18 fixed, target EMA μ = 0,
Heun teacher step on the teacher's EMA, uniform weighting, LPIPS distance (VGG max pooling, images upsampled
to 224), RAdam lr 4e-4 with no warm-up (the release's RAdam branch ignores the config's warm-up), batch 512,
800k steps, evaluation EMA 0.9999, random flips, float32. Two-step samples: `ts = (0, 11, 17)` on the
18-point grid (σ = 0.58535, the release notebook's ternary-search optimum). Samples are quantised by
truncation and scored with the TF1 Inception resize (clean-fid legacy_tensorflow). Every setting with its
source line: docs/fidelity.md.

Published FID (50k samples), CD-LPIPS: 3.55 (1 step) / 2.93 (2 steps). L2: no headline number.
cmjax: not yet measured. Compute: 8 A100 GPUs (CM paper, Table 3).

`:smoke`: a tiny MLP on the embedded digits for a few steps; the teacher must be a cifar10_edm.py:smoke run
(same image shape). `:lpips` needs the LPIPS VGG weights (cmjax.metrics.lpips).
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("lpips", "l2", "smoke"), "cifar10_cd")
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model = common.ncsnpp_cifar10(dropout=0.0)
    config.method.name = "cd"
    config.method.cd.teacher_solver = "heun"
    config.method.cd.curriculum = "fixed"
    config.method.cd.num_scales = 18
    config.method.cd.target_ema = 0.0
    config.method.cd.distance = common.lpips_or_l2(chosen, "cifar10_cd")
    config.method.cd.weighting = "uniform"
    # The student starts from the teacher (CD's fact in cmjax/methods.py; config.teacher.init_student=False: fresh).
    config.teacher.init_online_from = "online"  # finetune: params ← teacher params, params_ema ← teacher EMA
    config.teacher.ema_rate = ""  # the teacher's one rate (0.99929)
    config.batch_size = 512
    config.total_steps = 800_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 4e-4
    config.optim.warmup_steps = 0
    config.ema_rates = (0.9999,)
    config.sample.two_step_sigma = common.openai_ts_sigma(11, 18)
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
