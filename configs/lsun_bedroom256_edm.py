"""EDM teacher on LSUN Bedroom-256 (unconditional): the diffusion model that lsun_bedroom256_cd distils.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/lsun_bedroom256_edm.py \
      --workdir=gs://BUCKET/runs/bedroom_edm --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/lsun_bedroom256_edm.py:smoke --workdir=/tmp/bedroom_edm_smoke   # CPU

Settings of the CM release's teacher command (`scripts/launch.sh`): ADM UNet (256 ch, mult 1,1,2,2,4,4,
2 res blocks, attention at 32/16/8 with 64-channel heads, no scale-shift norm, resblock up/down:
526,304,771 parameters), dropout 0.1, EDM loss with lognormal σ, lr 1e-4, batch 256, EMA rates
0.999 / 0.9999 / 0.9999432, fp16 (bfloat16 here). The release trained it with an internal script
(`orc.diffusion.scripts.train_imagenet_edm`), so its optimizer (RAdam here, as the public edm_train.py), its
data loader and flips (on here, as the public loader) are not confirmed. The command runs until stopped; set
--config.total_steps (600k here is a placeholder of cmjax, not a published number). Samples are quantised by
truncation, as openai's image_sample.py. Every setting with its source line: docs/fidelity.md.

Published: no teacher FID in DESIGN §4. cmjax: not yet measured. Compute: not stated.

`:smoke`: a tiny unconditional MLP on the embedded digits for a few steps; its workdir is the teacher for
lsun_bedroom256_cd.py:smoke.
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "lsun_bedroom256_edm")
    config = default.get_config()
    config.data.name = "lsun_bedroom"
    config.data.random_flip = True  # not confirmed (internal trainer); the public loader's default
    config.model = common.adm_unet(256, dropout=0.1, num_classes=0)
    config.method.name = "edm"
    config.method.edm.p_mean = -1.2
    config.method.edm.p_std = 1.2
    config.batch_size = 256
    config.total_steps = 600_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = common.CM_EMA_RATES_IMAGENET
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
