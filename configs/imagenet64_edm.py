"""EDM teacher on class-conditional ImageNet-64: the diffusion model that imagenet64_cd distils.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_edm.py \
      --workdir=gs://BUCKET/runs/imagenet64_edm --data-dir=gs://BUCKET/tensorflow_datasets
  python -m cmjax.main --config=configs/imagenet64_edm.py:smoke --workdir=/tmp/imagenet64_edm_smoke   # CPU

Settings of the CM release's teacher command (`scripts/launch.sh` of openai/consistency_models,
`edm_train.py`): ADM UNet (192 ch, mult 1,2,3,4, 3 res blocks, attention at 32/16/8 with 64-channel heads,
scale-shift norm, resblock up/down, 1000 classes: 295,899,267 parameters), dropout 0.1, EDM loss with
lognormal σ and Karras weighting, RAdam lr 1e-4 constant (no warm-up, no clipping), batch 4096, EMA rates
0.999 / 0.9999 / 0.9999432, fp16 (bfloat16 here), random flips (the release's loader flips by default). The
release's command runs until stopped; 600k steps here (EDM trained its ImageNet-64 model for 2.5G images, about
610k steps at 4096): a placeholder, not a release value. Data: ILSVRC2012 train reduced to 64×64 by ADM's
center_crop_arr (cmjax/data/datasets.py; a manual download). Samples are quantised by truncation, as openai's
image_sample.py. Every setting with its source line: docs/fidelity.md.

Published: FID 2.44 with 79 network evaluations (the EDM row of the CM paper's ImageNet-64 table).
cmjax: not yet measured. Compute: not stated for the teacher.

`:trigflow`: the same teacher trained with TrigFlow's time input t = arctan(σ/σd) instead of 250·ln σ
(`config.method.edm.parameterization_kind = "trigflow"`; the same EDM loss and denoiser): the teacher
imagenet64_scd.py starts its student from (an sCD student reads its teacher's weights with the teacher's own time
conditioning, and the openai 250·ln σ one does not train as TrigFlow). CD and ECT distil the plain teacher.

`:smoke`: a tiny class-conditional MLP (10 classes) on the embedded digits for a few steps; its workdir is the
teacher for imagenet64_cd.py:smoke (`:trigflow,smoke` for imagenet64_scd.py:smoke).
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("trigflow", "smoke"), "imagenet64_edm")
    config = default.get_config()
    config.data.name = "imagenet64"
    config.data.random_flip = True  # the release's load_data(random_flip=True) default (cm/image_datasets.py)
    config.model = common.adm_unet(64, dropout=0.1, num_classes=1000)
    config.method.name = "edm"
    config.method.edm.p_mean = -1.2
    config.method.edm.p_std = 1.2
    config.method.edm.parameterization_kind = "trigflow" if "trigflow" in chosen else "edm"
    config.batch_size = 4096
    config.total_steps = 600_000
    config.optim.optimizer = "radam"
    config.optim.learning_rate = 1e-4
    config.ema_rates = common.CM_EMA_RATES_IMAGENET
    config.sample.quantize = "floor"
    config.log_every = 100
    config.ckpt_every = 5_000
    config.eval_every = 50_000
    return common.finish(config, chosen)
