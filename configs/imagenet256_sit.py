"""SiT (Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
Transformers") on class-conditional ImageNet 256×256 in SD-VAE latent space (32×32×4): flow matching on the linear
interpolant with velocity prediction (`config.method.name = "fm"`). One variant per size, `:s2`, `:b2`, `:l2`,
`:xl2` (default).

  python -m cmjax.main --config=configs/imagenet256_sit.py:xl2 --workdir=gs://BUCKET/runs/in256_sit_xl2
  python -m cmjax.main --config=configs/imagenet256_sit.py:smoke --workdir=/tmp/sit256_smoke  # CPU, digits

The network is cmjax's DiT (cmjax/models/dit.py), which is SiT's network; the data the ImageNet-256 SD-VAE latents
(`imagenet256_latents`), encoded once with `--mode=encode` and flips stored (`--config.data.random_flip=True`,
docs/latents.md); until they are, `--mode=train` stops with a ConfigError naming the encode command. `:smoke`
trains the same objective, label dropout included, on the embedded digits with a one-block class-conditional DiT.

Settings: the official PyTorch release willisma/SiT @ 947f95b (its models were trained in JAX on TPUs and ported,
README:159-163; that JAX code is not public). The objective is `transport.training_losses` with the defaults of
`train_utils.parse_transport_args` (Linear path, velocity prediction, no loss weight: train_utils.py:6-12) and
train_eps = 0 for that model (transport/__init__.py:53-55): t ~ U(0, 1), x_t = t·x1 + (1 − t)·x0 (t = 0 noise,
t = 1 data), loss mean (v_θ(x_t, t) − (x1 − x0))² (transport/transport.py:103-140, transport/path.py:114-131).
AdamW lr 1e-4, weight decay 0, torch's default betas (train.py:180-181), constant, no warm-up, no clipping; global
batch 256 (train.py:325); EMA 0.9999 (train.py:40, 254); 1400 epochs (train.py:324) of ⌊1,281,167/256⌋ batches
(drop_last, train.py:198-206) = 7,005,600 steps, the "7M" the DiT/SiT papers train XL/2 for (the paper's table was
not read: **not confirmed** beyond train.py's default). Labels dropped to the null label with probability 0.1
inside the network (`LabelEmbedder`, models.py:64-91, class_dropout_prob 0.1 at models.py:155): cmjax's
`config.model.label_dropout` with `null_label`. learn_sigma: the release's SiT defaults to learn_sigma=True
(models.py:157, 162; train.py:150-153 keeps it) and the velocity model uses only the first 4 of the 8 output
channels (models.py:245-246); the other 4 get no gradient and stay at their zero init. The recipe mirrors that
(`learn_sigma=True`), so the parameter tree is the release's (sample.py:27-42 loads the published 256×256
checkpoint with learn_sigma=True). Random flips (train.py:184-189) and a fresh posterior sample per step
(`latent_dist.sample()`, train.py:247) as cmjax's latent dataset draws; the release encodes with sd-vae-ft-ema
(train.py:327, "Choice doesn't affect training") and samples with sd-vae-ft-mse (sample.py:125).
Sizes (models.py:327-361): S/2 12 × 384 (6 heads), B/2 12 × 768 (12), L/2 24 × 1024 (16), XL/2 28 × 1152 (16).

Published FID-50K: SiT-XL/2 2.06 (README:14, 55; IS 270.27), with the SDE sampler ("by exploring various diffusion
coefficients", README:14); its classifier-free guidance scale (1.5 in the paper) and the ODE-sampler FIDs are
**not confirmed** here (the paper's tables were not read). The release's samplers: 250-step Euler–Maruyama SDE
(diffusion "sigma", last step "Mean" 0.04; train_utils.py:22-32, sample.py:129) or dopri5 ODE (atol 1e-6, rtol
1e-3; train_utils.py:14-20), CFG on the first 3 of the 4 latent channels (models.py:257-265). cmjax samples the
flow with the EDM Heun sampler over `parameterization.flow_denoise` (an ODE solver for the same flow; no SDE and no
guidance for fm runs yet); its periodic 1- and 2-step grids are denoiser estimates, not SiT's samples.
cmjax: not measured (no latents yet).
"""
from configs import common, default

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 1400  # train.py:324
# name: (depth, width, heads, patch) — willisma/SiT models.py:327-361 (`SiT_S_2` … `SiT_XL_2`).
SIT_SIZES = {"s2": (12, 384, 6, 2), "b2": (12, 768, 12, 2), "l2": (24, 1024, 16, 2), "xl2": (28, 1152, 16, 2)}


def get_config(arg: str | None = None):
    chosen, size = common.sized_variants(arg, SIT_SIZES, "imagenet256_sit")
    config = default.get_config()
    config.data.name = "imagenet256_latents"
    config.data.random_flip = True  # RandomHorizontalFlip before encoding (train.py:186)
    config.model = common.latent_dit(*SIT_SIZES[size], label_dropout=0.1, learn_sigma=True)
    config.method.name = "fm"
    config.method.fm.time_distribution = "uniform"
    config.method.fm.train_eps = 0.0
    config.batch_size = 256
    config.total_steps = EPOCHS * (IMAGENET_TRAIN_IMAGES // 256)
    config.optim.optimizer = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.warmup_steps = 0
    config.optim.decay = "constant"
    config.optim.grad_clip_norm = 0.0
    config.ema_rates = (0.9999,)
    config.sample.quantize = "round"  # clamp(127.5·x + 128, 0, 255).to(uint8) (sample_ddp.py:178)
    config.log_every = 100  # train.py:329
    config.ckpt_every = 50_000  # train.py:330
    config.eval_every = 50_000
    return common.finish(config, chosen)
