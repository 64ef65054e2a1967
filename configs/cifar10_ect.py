"""Easy consistency tuning (ECT, Geng et al. 2024) on CIFAR-10: starts from the cifar10_edm teacher's weights.

  python -m cmjax.main --config=configs/cifar10_ect.py --workdir=gs://BUCKET/runs/cifar10_ect \
      --config.teacher.workdir=gs://BUCKET/runs/cifar10_edm
  python -m cmjax.main --config=configs/cifar10_ect.py:smoke --workdir=/tmp/ect_smoke \
      --config.teacher.workdir=/tmp/cifar10_edm_smoke     # a cifar10_edm.py:smoke workdir

Settings (DESIGN §4 and the ECT release's `run_ecm.sh`): t = exp(Pm + Ps·n) with Pm = −1.1, Ps = 2.0;
r(t) with q = 2, k = 8, b = 1 and a stage every d = 25k steps; w = 1/(t − r); pseudo-Huber c = 0 (plain L2
norm); dropout 0.2; RAdam lr 1e-4; batch 128; 400k steps; evaluation EMA 0.9999 (a choice of cmjax).
Difference: the release tunes EDM's DDPM++ (VP, 55.7M parameters); cmjax tunes its own NCSN++ EDM teacher
(configs/cifar10_edm.py), so numbers may differ.

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
    config.data.random_flip = True
    config.model = common.ncsnpp_cifar10(dropout=0.2)
    config.method.name = "ect"
    config.method.ect.p_mean = -1.1
    config.method.ect.p_std = 2.0
    config.method.ect.q = 2.0
    config.method.ect.k = 8.0
    config.method.ect.b = 1.0
    config.method.ect.stage_steps = 25_000
    config.method.ect.huber_c = 0.0
    config.batch_size = 128
    config.total_steps = 400_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = (0.9999,)
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
