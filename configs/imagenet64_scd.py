"""Continuous-time consistency distillation (sCD, Lu & Song 2024, arXiv 2410.11081) on class-conditional
ImageNet-64, from the TrigFlow-conditioned EDM teacher of configs/imagenet64_edm.py:trigflow, starting from its
weights.

  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_edm.py:trigflow \
      --workdir=gs://BUCKET/runs/imagenet64_edm_trigflow --data-dir=gs://BUCKET/tensorflow_datasets
  launch/tpu_vm.sh run --name=cm --zone=ZONE --config=configs/imagenet64_scd.py \
      --workdir=gs://BUCKET/runs/imagenet64_scd --data-dir=gs://BUCKET/tensorflow_datasets \
      -- --config.teacher.workdir=gs://BUCKET/runs/imagenet64_edm_trigflow
  python -m cmjax.main --config=configs/imagenet64_edm.py:trigflow,smoke --workdir=/tmp/imagenet64_edm_tf_smoke
  python -m cmjax.main --config=configs/imagenet64_scd.py:smoke --workdir=/tmp/imagenet64_scd_smoke \
      --config.teacher.workdir=/tmp/imagenet64_edm_tf_smoke   # CPU

Settings: NVlabs FastGen's ImageNet-64 sCD (`fastgen/configs/experiments/EDM/config_scd_in64.py` on
`configs/methods/config_scm.py`; OpenAI released no code and the paper's appendix was not read, so every value
is **not confirmed against the paper**): teacher EDM's class-conditional ADM (line 38, `edm-imagenet-64x64-
cond-adm`), dropout 0 (:40); Adam lr 7e-5, betas (0.9, 0.99), eps 1e-11, weight decay 0 (:27-31); EDM2's
inverse-square-root decay after 35k iterations, no warm-up (:32-35); gradient clipping at norm 10 (:19);
bfloat16 with the JVP in float32 (:22-23); EMA 0.9999 / 0.99995 / 0.9996 (:44-48, `configs/callbacks.py:27-31`);
τ ~ N(−1.0, 1.6²) (:50-51); batch 1024, 600k iterations (:66-67); 2-step t-list [80, 1.1, 0] in σ (:58,
commented as the recommended 2-step setting); tangent warm-up 10k, c = 0.1 on the spatially invariant norm, the
learned log-variance head with prior weight 1/σ (`config_scm.py:50-59`, `sCM.py` `_scm_pred_to_loss`); no
classifier-free guidance (FastGen's `guidance_scale` default None, `configs/config.py:105`).

Differences, all known: the student starts from the teacher's weights as FastGen's does (`pretrained_model_path`,
:37), but that teacher is trained with TrigFlow's time input t (sCM's identity time transform; imagenet64_edm.py:
trigflow) and the student reads it the same way ("trigflow"). FastGen's teacher is EDM's ADM with c_noise =
¼·ln σ (`networks/EDM/network.py:775`), read as TrigFlow by the student; the openai ADM that cmjax's plain teacher
is embeds 1000·c_noise = 250·ln σ, whose time derivative is 1000× larger and does not train as TrigFlow (on the
2-D ring: 0.63 from that teacher against 0.044 from the TrigFlow-conditioned one, docs/quality.md).
cmjax's JVP runs in the network's compute dtype (bfloat16) with float32 primals and tangents; the network is
cmjax's ADM UNet (the teacher's), not the paper's.

Published FID (50k samples, 1 / 2 steps): sCD 2.44 / 1.66 (DESIGN §4; which model size is not confirmed).
cmjax: not yet measured.

`:smoke`: a tiny class-conditional MLP (10 classes) on the embedded digits for a few steps; its teacher is
imagenet64_edm.py:trigflow,smoke's workdir.
"""
from configs import common, default


def get_config(arg: str | None = None):
    chosen = common.variants(arg, ("smoke",), "imagenet64_scd")
    config = default.get_config()
    config.data.name = "imagenet64"
    config.data.random_flip = True
    config.model = common.adm_unet(64, dropout=0.0, num_classes=1000)
    config.model.logvar_head = True  # the adaptive weight w(t)
    config.method.name = "scd"
    config.method.scd.p_mean = -1.0
    config.method.scd.p_std = 1.6
    config.method.scd.sigma_data = 0.5
    config.method.scd.tangent_warmup_steps = 10_000
    config.method.scd.tangent_norm_c = 0.1
    config.method.scd.tangent_norm = "rms"
    config.method.scd.weighting = "adaptive_prior"
    config.method.scd.jvp_mode = "exact"
    config.method.scd.parameterization_kind = "trigflow"
    config.method.scd.guidance_scale = 1.0
    config.teacher.init_student = True  # from imagenet64_edm.py:trigflow (FastGen: pretrained_model_path, :37)
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
