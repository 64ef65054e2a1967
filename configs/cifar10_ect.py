"""Easy consistency tuning (ECT, Geng et al. 2024) on CIFAR-10: starts from the cifar10_edm teacher's weights.

  python -m cmjax.main --config=configs/cifar10_ect.py --workdir=gs://BUCKET/runs/cifar10_ect \
      --config.teacher.workdir=gs://BUCKET/runs/cifar10_edm
  python -m cmjax.main --config=configs/cifar10_ect.py:smoke --workdir=/tmp/ect_smoke \
      --config.teacher.workdir=/tmp/cifar10_edm_smoke     # a cifar10_edm.py:smoke workdir

Settings of the ECT release (locuslab/ect `run_ecm.sh`, `ct_train.py`; DESIGN §4): student and EMA start from
the teacher's EMA; t = exp(Pm + Ps·n) with Pm = −1.1, Ps = 2.0; r(t) with q = 2, k = 8, b = 1 and a stage every
d = 25k steps; w = 1/(t − r); pseudo-Huber c = 0 (plain L2 norm); EDM scalings in training; dropout 0.2; RAdam
lr 1e-4, no warm-up; batch 128; 400k steps (the README's row; `run_ecm.sh` itself runs 200k); evaluation EMA
0.9999 (the release's default `ema_beta`); no x-flip and no augmentation (`--augment=0.0`, `--xflip` off).
Evaluation as the release: the boundary scalings at ECT's σ_min = 0.003, renoising x + τ·z without clipping
between steps (cmjax/methods.py), 2-step σ = 0.821 (`--mid_t`), samples rounded to uint8, the TF1 Inception
resize (the NVIDIA detector ECT uses). Difference: the release tunes EDM's DDPM++ (VP, 55.7M parameters); cmjax
tunes its own NCSN++ EDM teacher (configs/cifar10_edm.py), so numbers may differ. Every setting with its source
line: docs/fidelity.md.

Published FID (50k samples), ECT at 400k steps: 3.60 (1 step) / 2.11 (2 steps); at 200k: 3.86 / 2.15.
cmjax: not yet measured. Compute: the release recommends 2–4 GPUs for its 200k-step run.

`:smoke`: a tiny MLP on the embedded digits for a few steps; the teacher must be a cifar10_edm.py:smoke run
(ECT starts from its weights, so the networks must match).
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "cifar10_ect")
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = False  # run_ecm.sh: --augment=0.0, and --xflip defaults to False
    config.model = common.ncsnpp_cifar10(dropout=0.2)
    config.method.name = "ect"
    config.method.ect.p_mean = -1.1
    config.method.ect.p_std = 2.0
    config.method.ect.q = 2.0
    config.method.ect.k = 8.0
    config.method.ect.b = 1.0
    config.method.ect.stage_steps = 25_000
    config.method.ect.huber_c = 0.0
    config.teacher.init_online_from = "ema"  # --transfer: net and ema both ← the checkpoint's ema
    config.batch_size = 128
    config.total_steps = 400_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = (0.9999,)
    config.sample.two_step_sigma = 0.821
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
