"""iCT on the embedded digits dataset (8×8 grayscale, 1,437 training images): the `make demo` job.

  python -m cmjax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m cmjax.main --config=configs/digits.py:smoke --workdir=/tmp/digits_smoke   # a few CPU steps (tiny MLP)
  python -m cmjax.main --config=configs/digits.py:smoke_unet --workdir=/tmp/digits_unet   # the same, a tiny UNet
  python -m cmjax.main --config=configs/digits.py:dit --workdir=workdirs/digits_dit   # the job with a small DiT
  python -m cmjax.main --config=configs/digits.py:smoke_dit --workdir=/tmp/digits_dit   # a few steps, a tiny DiT
  python -m cmjax.main --config=configs/digits.py:color_ncsnpp --workdir=runs/color_ncsnpp  # conv nets, 32x32x3
  python -m cmjax.main --config=configs/digits.py:color_adm --workdir=runs/color_adm

`color_ncsnpp` / `color_adm`: iCT on `color_digits32` (the digits upsampled to 32x32 and coloured per image,
cmjax/data/digits.py) with the CIFAR-10 recipes' network families reduced: NCSN++ of configs/cifar10_ict.py
(BigGAN blocks, FIR, progressive residual input, Fourier 0.02) at nf 16, ch_mult (1, 2, 2), one block per level,
attention at 8x8; the ADM UNet of configs/imagenet64_ict.py (scale-shift norm, resblock up/down) at 32 channels,
(1, 2, 2), one block, attention at 8x8. σ_max = 80 (3,072 dimensions: the KL bound above is ~0.07 nats there).
Sized for a learning proof of ~21 CPU-minutes each (720 steps, measured 2026-12-05), not for quality (docs/quality.md).

No published numbers exist for this dataset; quality is measured by a digit classifier trained in-repo
(`cmjax/metrics/digits.py`): Fréchet distance in its feature space and the fraction of confidently
classified samples (target ≥ 80 % for 1-step samples, every class between 5 % and 15 %).

Sized for the 10-minute budget on 2 idle CPU cores (measured below), run on ONE XLA device:

  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu python -m cmjax.main \
      --config=configs/digits.py --workdir=workdirs/digits --config.mesh.data=1

The network is the residual MLP on the flattened 64-d image (`cmjax/models/toy.py`: 256 wide, 4 blocks,
0.92M parameters, no dropout). Dense layers suit the CPU: on one device it ran 16–45 steps/s at batch 128
where a 32-channel one-resolution UNet without attention ran 1.1–1.6. On 8 virtual devices (the Makefile's)
it ran 5–9 steps/s, and 3 of 5 MLP runs there aborted in XLA's CPU all-reduce rendezvous on a loaded machine.
No left-right flips: mirrored digits are not digits.

What moved the 1-step samples (1,024 samples, EMA 0.998–0.999, seed 0; 2026-11-26, two runs side by side):
- 3,000 steps, constant lr 1e-3, s1 = 80: 71 % confident, Fréchet 12.3 (the earlier default; batch 512: 72 %,
  512 wide: 64–66 %, dropout 0.1: 63–64 %, 4,000 steps: 65 %).
- cosine decay to 0 (`optim.decay`), 3,000 steps: 71 %, Fréchet 8.8; 9,000 steps, s1 = 160: 76 %, Fréchet 5.2.
- 18,000 steps, cosine, s1 = 160, σ_max = 80: 80 % confident, Fréchet 5.6, classes 7.2–16.7 % (the digit 8
  over-produced: 15.3 % of 4,096 samples, systematic; 2-step 84 %, Fréchet 4.8). Tried against the 8 at σ_max =
  80 (4,096 samples): s1 = 320 (16.4 %), σ_data = 0.75 and FiLM conditioning (no better at 9k steps),
  p_mean = −0.6 (14.7 % with seed 0, 15.7 % with seed 1), p_mean = −0.2 (15.5 %), lr 2e-3 (18.6 %), the MLP's
  time input embedded as EDM's ¼·ln σ instead of 250·ln σ (15.8 %, 512 samples).
- The clue: the σ_max = 80 model sampled in one step from a lower σ (f(σ·z, σ)) got better as σ fell (the 8:
  15.3 % at 80, 14.9 % at 20, 14.1 % at 10; Fréchet 4.6 → 4.0): its f is least accurate at the top of the range,
  which iCT's lognormal rarely samples, and σ = 80 is far beyond what 64 pixels need (see sigma_max below).
- σ_max = 10, s1 = 80 (this file; 4,096 samples, two training seeds × two sampling seeds): 1-step 81.5–83.1 %
  confident, Fréchet 3.6–4.2, the 8 at 13.1–14.6 %; 2-step (σ 0.8) 86–89 %, Fréchet 2.2–3.8. With s1 = 160
  (N up to 161) the 1-step was as good (80.0–81.6 %, the 8 at 13.4–14.0 %) but the 2-step worse than the 1-step
  (Fréchet 5.7–6.9, erratic over σ_mid): the finer grid below σ = 1 trained the small σ worse. σ_max = 20 with
  s1 = 160: 79.3–83.1 %, the 8 at 14.5–14.9 %.
`make demo` with this file (nothing else running, 2026-11-27): 9 min 34 s wall, 38 steps/s (median); its final
evaluation (512 samples), EMA 0.998: 1-step 82.2 % confident, Fréchet 4.2, classes 8.2–13.9 %; 2-step 89.6 %,
Fréchet 3.0, classes 7.8–13.7 %.
For scale: the EDM teacher on this MLP, 3,000 steps with its 35-evaluation sampler, scores 82 %, Fréchet 3.7;
real test images 95 %, Fréchet 3.2.

`:dit` (the DiT notes): the same job with a small DiT (cmjax/models/dit.py: patch 2, 4 blocks × 64, 4 heads,
328,260 parameters) for 4,000 steps. It does not fit the demo's 10 minutes on a 2-core CPU: at the median 1.45
steps/s measured (a loaded machine) 4,000 steps take 46 min; its speed on idle cores was not measured (a 4 × 128
DiT ran 1.4 steps/s at load ~3, where the MLP runs 16–45). Measured 2026-12-03 (4,096 samples, EMA 0.998;
docs/quality.md): 1-step 59.4 % confident, Fréchet 7.1, classes 6.3–15.2 %; 2-step 63.8 %, Fréchet 5.9: it learns
the digits but stays below the MLP's 80 % in these steps. 57 min wall on a machine at load 3–24 (other jobs).
"""
import ml_collections

from configs import common, default

DIT_STEPS = 4000  # `:dit` (see the DiT notes above)


def dit_model() -> ml_collections.ConfigDict:
    """`:dit`: a small DiT (cmjax/models/dit.py) on the 8×8×1 digits: patch 2 (16 tokens), 4 blocks of width 64,
    4 heads, unconditional, float32 (the CPU has no bfloat16 units)."""
    return ml_collections.ConfigDict({
        "name": "dit", "image_size": 8, "in_channels": 1, "out_channels": 1, "depth": 4, "hidden_size": 64,
        "num_heads": 4, "patch_size": 2, "mlp_ratio": 4.0, "num_classes": 0, "dropout": 0.0, "dtype": "float32",
        "remat": False})


def get_config(arg: str | None = None):
    config = default.get_config()
    config.total_steps = 18000
    config.eval_every = 6000  # each evaluation samples 2 × 512 images and scores them (a few seconds)
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.decay = "cosine"
    config.data.random_flip = False
    config.ema_rates = (0.998, 0.999)
    # σ_max sized to the data: E‖x‖²/(2σ_max²), a bound on the KL between N(0, σ_max²I) and the noised data
    # (the prior the sampler starts from), is 0.23 nats here at σ_max = 10; EDM's 80 gives CIFAR-10 ~0.06.
    # 80 left the 1-step samples worse (the digit 8 over-produced at 15.3 %, see above).
    config.method.ict.sigma_max = 10.0
    config.method.ict.s1 = 80  # N = 11, 21, 41, 81: four stages of 4,500 steps
    config.model = ml_collections.ConfigDict({
        "name": "mlp",
        "hidden_dim": 256,
        "num_layers": 4,
        "time_embed_dim": 128,
        "num_classes": 0,
        "dropout": 0.0,
        "dtype": "float32",
        "remat": False,
        # Heads and the "no class" row that some objectives need, off here (settable from the command line).
        "logvar_head": False,
        "velocity_head": False,
        "null_label": False,
    })
    if arg in ("dit", "smoke_dit"):
        config.model = dit_model()
    if arg == "dit":
        config.total_steps = DIT_STEPS
        config.eval_every = DIT_STEPS // 3
        config.method.ict.s1 = 80
    elif arg in ("smoke", "smoke_unet", "smoke_dit"):
        # A tiny run: batch 16, 6 steps. `smoke`: the residual MLP at 64 wide, 2 blocks (compiles in seconds);
        # `smoke_unet`: configs/default.py's 32-channel UNet, for checks of the conv net through the loop.
        if arg == "smoke":
            config.model.hidden_dim = 64
            config.model.num_layers = 2
            config.model.time_embed_dim = 64
        elif arg == "smoke_dit":
            config.model.update(depth=1, hidden_size=32, num_heads=2)
        else:
            config.model = default.get_config().model
        config.total_steps = 6
        config.batch_size = 16
        config.optim.warmup_steps = 2
        config.optim.decay = "constant"  # a cosine over 6–40 test steps would slow the fall the tests check
        config.log_every = 2
        config.ckpt_every = 3
        config.eval_every = 0
        config.ema_rates = (0.999,)
        config.sample.num_images = 16
        config.sample.metric_samples = 0
    elif arg in ("color_ncsnpp", "color_adm"):
        config.data.name = "color_digits32"
        config.method.ict.sigma_max = 80.0
        config.batch_size = 32
        # 720 steps ≈ 20 minutes on one core of the 2-core CPU (~20 images/s per run, two runs side by side,
        # measured 2026-12-04): the budget for a learning proof. N = 11, 21, 41, 81 in stages of 180.
        config.total_steps = 720
        config.eval_every = 360
        config.ckpt_every = 240
        config.log_every = 50
        config.optim.learning_rate = 5e-4
        config.ema_rates = (0.99, 0.995)
        config.sample.metric_samples = 512
        if arg == "color_ncsnpp":
            config.model = common.ncsnpp_cifar10(dropout=0.0, fourier_scale=0.02)
            config.model.nf = 16
            config.model.ch_mult = (1, 2, 2)
            config.model.num_res_blocks = 1
            config.model.attn_resolutions = (8,)
        else:
            config.model = common.adm_unet(32, dropout=0.0, num_classes=0)
            config.model.model_channels = 32
            config.model.channel_mult = (1, 2, 2)
            config.model.num_res_blocks = 1
            config.model.attention_resolutions = (8,)
            config.model.num_head_channels = 32
            config.model.dtype = "float32"
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/digits.py; use '', 'smoke', 'smoke_unet', 'dit', "
                         "'smoke_dit', 'color_ncsnpp' or 'color_adm'.")
    return config
