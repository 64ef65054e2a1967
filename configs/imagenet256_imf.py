"""Improved MeanFlow (iMF; Geng, Lu et al. 2025, arXiv 2512.02012) on class-conditional ImageNet 256×256 in SD-VAE
latent space: one variant per iMF size, `:b2`, `:m2`, `:l2`, `:xl2` (default).

  python -m cmjax.main --config=configs/imagenet256_imf.py:b2 --workdir=gs://BUCKET/runs/in256_imf_b2
  python -m cmjax.main --config=configs/imagenet256_imf.py:smoke --workdir=/tmp/imf256_smoke   # CPU, digits

The network is cmjax's standard adaLN-Zero DiT (`config.model.name = "dit"`, cmjax/models/dit.py) at iMF's sizes,
with an auxiliary v-head branch (`velocity_head`); iMF's own is an in-context-conditioned DiT with RMSNorm, RoPE,
SwiGLU and conditioning tokens (Lyy-iiis/imeanflow models/imfDiT.py, models/mit.py), not implemented. The data:
the ImageNet-256 SD-VAE latents (`imagenet256_latents`), encoded once with `--mode=encode` (docs/latents.md);
until they are, `--mode=train` stops with a ConfigError naming the encode command. `:smoke` trains the same
objective (guidance conditioning and v-head included) on the embedded digits with a one-block class-conditional
DiT.

iMF's objective, complete (losses.meanflow_loss): guidance as conditioning (iMF §5; imf.py `sample_cfg_scale`,
`sample_cfg_interval`, `guidance_fn`, `cond_drop`): ω per sample, log-uniform on [1, 8] (`cfg_max` 7, `cfg_beta`
1), an interval t_min ~ U(0, 0.5), t_max ~ U(0.5, 1) ([0, 1] where r = t), the guided target v_g = v + (1 − 1/w)·
(v_θ(c, w) − v_θ(∅, 1)) with w = ω inside the interval, and (1 − 1/ω, t_min, t_max) fed to the network; the JVP
along the network's own conditional velocity (`tangent = "predicted"`, iMF §4.1); the auxiliary v-head
(`config.model.velocity_head`) with its own adaptively weighted loss (imf.py `forward`: loss_u + loss_v); r = t
for 50 % of each batch. Release settings (configs/default.py and configs/train_config.yml): Adam lr 1e-4, b2 0.95,
batch 1024, 640 epochs (800,729 steps), 10 warm-up epochs (12,511 steps), EMA 0.9999, logit-normal (−0.4, 1.0)
for both times, class dropout 0.1, adaptive weight p = 1, c = 0.01; 1-NFE sampling from t = 1 (imf.py `generate`:
linspace(1, 0, steps + 1)) at the release's per-size guidance (configs/eval_config.yml: B/2 ω 8.0 on
[0.4, 0.65]; M/2, L/2 10.5 on [0.4, 0.6]; XL/2 8.0 on [0.42, 0.62], 2-NFE 4.0 on [0.36, 0.64]).
iMF sizes (models/imfDiT.py, `imfDiT_*`): B/2 12 × 768 (12 heads), M/2 24 × 768, L/2 32 × 1024 (16 heads),
XL/2 48 × 1024, each depth counting the shared blocks and the u-head's 8; the v-head's 8 blocks come on top.

Published FID (50k samples, 1-NFE; the release README "this repo / paper"): iMF-B/2 3.37 / 3.39, M/2 2.27 / 2.27,
L/2 1.85 / 1.86, XL/2 1.70 / 1.72 (2-NFE 1.53 / 1.54). cmjax: not measured (no iMF transformer, no latents).
"""
from configs import common, default

IMAGENET_TRAIN_IMAGES = 1_281_167
# name: (ω, (t_min, t_max)) the release samples its checkpoints with, 1-NFE (configs/eval_config.yml:13-20; XL/2
# 2-NFE: ω 4.0 on (0.36, 0.64)).
SAMPLING_GUIDANCE = {"b2": (8.0, (0.4, 0.65)), "m2": (10.5, (0.4, 0.6)), "l2": (10.5, (0.4, 0.6)),
                     "xl2": (8.0, (0.42, 0.62))}
# name: (depth, width, heads, patch) — Lyy-iiis/imeanflow models/imfDiT.py (`imfDiT_B_2` … `imfDiT_XL_2`).
IMF_SIZES = {"b2": (12, 768, 12, 2), "m2": (24, 768, 12, 2), "l2": (32, 1024, 16, 2), "xl2": (48, 1024, 16, 2)}


def get_config(arg: str | None = None):
    chosen, size = common.sized_variants(arg, IMF_SIZES, "imagenet256_imf")
    config = default.get_config()
    config.data.name = "imagenet256_latents"
    config.data.random_flip = True  # not confirmed (precomputed latents)
    config.model = common.latent_dit(*IMF_SIZES[size], velocity_head=True)
    config.method.name = "meanflow"
    config.method.meanflow.time_dist = "logit_normal"
    config.method.meanflow.p_mean_t = -0.4
    config.method.meanflow.p_std_t = 1.0
    config.method.meanflow.p_mean_r = -0.4
    config.method.meanflow.p_std_r = 1.0
    config.method.meanflow.equal_fraction = 0.5
    config.method.meanflow.tr_order = "sort"
    config.method.meanflow.norm_p = 1.0
    config.method.meanflow.norm_eps = 0.01
    config.method.meanflow.tangent = "predicted"
    config.method.meanflow.guidance = "conditioned"
    config.method.meanflow.cfg_max = 7.0
    config.method.meanflow.cfg_beta = 1.0
    config.method.meanflow.class_dropout = 0.1
    config.batch_size = 1024
    config.total_steps = 640 * IMAGENET_TRAIN_IMAGES // 1024
    config.optim.optimizer = "adam"
    config.optim.learning_rate = 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.warmup_steps = 10 * IMAGENET_TRAIN_IMAGES // 1024
    config.optim.decay = "constant"
    config.ema_rates = (0.9999,)
    config.sample.two_step_time = 0.5
    config.sample.guidance_scale, config.sample.guidance_interval = SAMPLING_GUIDANCE[size]
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    config = common.finish(config, chosen)
    return config
