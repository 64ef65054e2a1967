"""Continuous-time consistency training (sCT, Lu & Song 2024, arXiv 2410.11081) on class-conditional ImageNet-64,
from scratch.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_sct.py \
      --workdir=gs://BUCKET/runs/imagenet64_sct --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/imagenet64_sct.py:smoke --workdir=/tmp/imagenet64_sct_smoke   # CPU

Settings: neither OpenAI nor NVlabs FastGen published an ImageNet-64 sCT configuration, and the paper's appendix
was not read, so this recipe is FastGen's ImageNet-64 **sCD** recipe (configs/imagenet64_scd.py, cited there)
with the sCT objective, and most values are **not confirmed**: τ ~ N(−0.8, 1.6²) (DESIGN §4's ImageNet-64
proposal; FastGen's ImageNet-64 CM recipe `config_cm_in64.py:39-40` uses the same), dropout 0.2 (FastGen's
ImageNet-64 CM recipe, `config_cm_in64.py:49`; not confirmed for sCT), Adam lr 7e-5 with betas (0.9, 0.99),
eps 1e-11, inverse-square-root decay after 35k iterations, gradient clipping 10, batch 1024, 600k iterations,
EMA 0.9999 / 0.99995 / 0.9996, 2-step σ 1.1, tangent warm-up 10k, c = 0.1, the learned log-variance head with
the prior weight 1/σ (FastGen `config_scm.py:50-59`). The network is cmjax's ADM UNet (the ImageNet-64 teacher's)
with the "trigflow" conditioning (time input t, positional embedding: sCM's identity time transform), not the
paper's network; AdaGN as openai's (the ADM FastGen uses has no pixel norm; `config.model.emb_norm=
"double_pixel_norm"` is sCM's §4.1 variant, off here).

Published FID (50k samples, 1 / 2 steps): sCT 2.04 / 1.48 (DESIGN §4: the largest, sCT-XL, model; the paper's
table not read here). cmjax: not yet measured.

`:smoke`: a tiny class-conditional MLP (10 classes) on the embedded digits for a few steps.
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "imagenet64_sct")
    config = default.get_config()
    config.data.name = "imagenet64"
    config.data.random_flip = True
    config.model = common.adm_unet(64, dropout=0.2, num_classes=1000)
    config.model.logvar_head = True  # the adaptive weight w(t)
    config.method.name = "sct"
    config.method.sct.p_mean = -0.8
    config.method.sct.p_std = 1.6
    config.method.sct.sigma_data = 0.5
    config.method.sct.tangent_warmup_steps = 10_000
    config.method.sct.tangent_norm_c = 0.1
    config.method.sct.tangent_norm = "rms"
    config.method.sct.weighting = "adaptive_prior"
    config.method.sct.jvp_mode = "exact"
    config.method.sct.parameterization_kind = "trigflow"
    config.batch_size = 1024
    config.total_steps = 600_000
    config.optim.optimizer = "adam"
    config.optim.learning_rate = 7e-5
    config.optim.b1 = 0.9
    config.optim.b2 = 0.99
    config.optim.eps = 1e-11
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 0
    config.optim.decay = "inverse_sqrt"
    config.optim.decay_start_step = 35_000
    config.optim.grad_clip_norm = 10.0
    config.ema_rates = (0.9999, 0.99995, 0.9996)
    config.sample.two_step_sigma = 1.1
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
