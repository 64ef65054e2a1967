"""MeanFlow (Geng et al. 2025, arXiv 2505.13447) on CIFAR-10, unconditional, from scratch: the paper's setting.

  python -m cmjax.main --config=configs/cifar10_meanflow.py --workdir=gs://BUCKET/runs/cifar10_meanflow
  python -m cmjax.main --config=configs/cifar10_meanflow.py:smoke --workdir=/tmp/meanflow_smoke   # CPU, digits

Settings: the authors' CIFAR-10 release Gsunshine/py-meanflow, `meanflow/scripts/cifar10_v0.sh` ("the original
configuration used in the paper", README) with `meanflow/train_arg_parser.py`'s defaults: batch 128 × 8 GPUs =
1024, Adam lr 6e-4, betas (0.9, 0.999), linear warm-up over 200 epochs then constant (train.py:157-167), 16,000
epochs ≈ 800k iterations (README), dropout 0.2, EMA 0.9999 with extra EMAs 0.99995 and 0.9996 (updated every 16
steps there, models/ema.py:13-21; cmjax updates every step), (t, r) sampler "v0": t and r independent logit-normal
(−2.0, 2.0), t, r = max, min, r ≠ t for 75 % of samples (`--ratio 0.75`), adaptive weight p = 0.75,
c = 1e-3, JVP along v = ε − x; 1-step sampling x = ε − u(ε, 0, 1); samples floored to uint8 (eval_loop.py:70-73).
Differences, all known: the release's network is EDM's DDPM++ `SongUNet` (channel_mult (2, 2, 2), FIR
[1, 3, 3, 1], standard encoder/decoder, positional embeddings of t and t − r concatenated,
models/model_configs.py:16-27, unet.py:368-374); cmjax's nearest is its NCSN++ (the CM release's, BigGAN blocks
with FIR and skip_rescale) with progressive_input "none" (the standard encoder) and Fourier features of each time
(scale 16 on t: fourier_scale 16,000 because cmjax's NCSN++ embeds time_input/1000; a choice, not confirmed);
`--use_edm_aug` (EDM's augmentation pipeline with its 6 augment labels as a condition) is not implemented (flips
only); the fraction of r = t is a fixed count per batch here, a per-sample draw there. Every setting with its
source: docs/fidelity.md.

Published FID (50k samples, 1-NFE): 2.92 (the paper's Table; py-meanflow README: "~2.9 at 16000 epochs" for the
v1 sampler, its demo checkpoint ~2.80). cmjax: not yet measured at this scale (docs/quality.md has the digits).

`:smoke`: a tiny MLP on the embedded digits for a few steps (configs/common.py).
"""
from configs import common, default

CIFAR10_IMAGES = 50_000


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "cifar10_meanflow")
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model = common.ncsnpp_cifar10(dropout=0.2, fourier_scale=16_000.0)
    config.model.progressive_input = "none"
    config.method.name = "meanflow"
    config.method.meanflow.time_dist = "logit_normal"
    config.method.meanflow.p_mean_t = -2.0
    config.method.meanflow.p_std_t = 2.0
    config.method.meanflow.p_mean_r = -2.0
    config.method.meanflow.p_std_r = 2.0
    config.method.meanflow.equal_fraction = 0.25
    config.method.meanflow.tr_order = "sort"
    config.method.meanflow.norm_p = 0.75
    config.method.meanflow.norm_eps = 1e-3
    config.method.meanflow.tangent = "sample"
    config.method.meanflow.guidance = "none"
    config.method.meanflow.jvp_mode = "exact"
    config.batch_size = 1024
    config.total_steps = 800_000
    config.optim.optimizer = "adam"
    config.optim.learning_rate = 6e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.warmup_steps = round(200 * CIFAR10_IMAGES / 1024)  # 200 epochs of 48.8 batches (drop_last)
    config.optim.decay = "constant"
    config.ema_rates = (0.9999, 0.99995, 0.9996)
    config.sample.quantize = "floor"
    config.sample.two_step_time = 0.5
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
