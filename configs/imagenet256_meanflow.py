"""MeanFlow (Geng et al. 2025) on class-conditional ImageNet 256×256 in SD-VAE latent space (32×32×4), with
classifier-free guidance trained in: one variant per DiT size, `:b4` (the release's sanity check), `:b2`, `:m2`,
`:l2`, `:xl2` (default).

  python -m cmjax.main --config=configs/imagenet256_meanflow.py:xl2 --workdir=gs://BUCKET/runs/in256_mf_xl2
  python -m cmjax.main --config=configs/imagenet256_meanflow.py:smoke --workdir=/tmp/mf256_smoke  # CPU, digits

The network is cmjax's DiT (`config.model.name = "dit"`, cmjax/models/dit.py); the data the ImageNet-256 SD-VAE
latents (`config.data.name = "imagenet256_latents"`), encoded once from TFDS imagenet2012 with `--mode=encode`
(docs/latents.md); until they are, `--mode=train` stops with a ConfigError naming the encode command. `:smoke`
trains the same objective, guidance included, on the embedded digits with a one-block class-conditional DiT.

Settings: the official JAX release Gsunshine/meanflow, configs/default.py:32-71 and configs/run_b4.yml: Adam
lr 1e-4, b2 0.95, batch 256, EMA 0.9999, 240 epochs (run_b4.yml:11; 1,281,167 images: 1,201,094 steps), no
warm-up; t, r logit-normal (−0.4, 1.0), t, r = max, min, r = t for the first 75 % of each batch
(`data_proportion` 0.75; meanflow.py:147-157); class dropout 0.1 to the null label; guidance folded in with ω = 1.0,
κ = 0.5 on t ∈ [0, 1] (meanflow.py:171-189; README: the same effective scale ω/(1 − κ) = 2 as Table 1f's ω = 2,
κ = 0); adaptive weight p = 1.0, c = 0.01; JVP along the guided velocity (meanflow.py:226-236); 1-NFE sampling
from t = 1 (`sampling_timesteps` [1, 0]). DiT sizes as models/models_dit.py:286-300 (B: 12 × 768, 12 heads;
M: 16 × 1024; L: 24 × 1024; XL: 28 × 1152; 16 heads), t and t − r embedded separately and summed with the label
(models_dit.py:218-221). The paper's per-size ω, κ and interval (its appendix table) and epochs beyond 240 are
not confirmed here: every size uses the release's B/4 values.

Published FID (50k samples, 1-NFE / 2-NFE): MF-B/4 11.4 (release README, this repo's run: 11.35 at 240 epochs);
MF-B/2 6.17 (cited in the iMF paper's comparison), MF-XL/2 3.43 / 2.93 (DESIGN §4); M/2 and L/2 not confirmed.
cmjax: not measured (no latents yet).
"""
from configs import common, default

IMAGENET_TRAIN_IMAGES = 1_281_167
# name: (depth, width, heads, patch) — Gsunshine/meanflow models/models_dit.py:286-300.
DIT_SIZES = {"b4": (12, 768, 12, 4), "b2": (12, 768, 12, 2), "m2": (16, 1024, 16, 2), "l2": (24, 1024, 16, 2),
             "xl2": (28, 1152, 16, 2)}


def get_config(arg: str | None = None):
    chosen, size = common.sized_variants(arg, DIT_SIZES, "imagenet256_meanflow")
    config = default.get_config()
    config.data.name = "imagenet256_latents"
    # The release trains without flips: its LatentDataset(use_flip=True) returns the stored latent as is, and the
    # encode reads unflipped center crops (utils/vae_util.py, utils/data_util.py `compute_latent_dataset`).
    config.data.random_flip = False
    config.model = common.latent_dit(*DIT_SIZES[size])
    config.method.name = "meanflow"
    config.method.meanflow.time_dist = "logit_normal"
    config.method.meanflow.p_mean_t = -0.4
    config.method.meanflow.p_std_t = 1.0
    config.method.meanflow.p_mean_r = -0.4
    config.method.meanflow.p_std_r = 1.0
    config.method.meanflow.equal_fraction = 0.75
    config.method.meanflow.tr_order = "sort"
    config.method.meanflow.norm_p = 1.0
    config.method.meanflow.norm_eps = 0.01
    config.method.meanflow.tangent = "sample"
    config.method.meanflow.guidance = "cfg"
    config.method.meanflow.omega = 1.0
    config.method.meanflow.kappa = 0.5
    config.method.meanflow.t_start = 0.0
    config.method.meanflow.t_end = 1.0
    config.method.meanflow.class_dropout = 0.1
    config.batch_size = 256
    config.total_steps = 240 * IMAGENET_TRAIN_IMAGES // 256
    config.optim.optimizer = "adam"
    config.optim.learning_rate = 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.warmup_steps = 0
    config.optim.decay = "constant"
    config.ema_rates = (0.9999,)
    config.sample.two_step_time = 0.5
    config.log_every = 100
    config.ckpt_every = 10_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
