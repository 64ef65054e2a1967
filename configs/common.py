"""Pieces the recipe files share: variant parsing, the published networks, and the `:smoke` shrink.

A recipe is `configs/<dataset>_<method>.py` with `get_config(arg)`; `arg` is a comma-separated list of
variants (`configs/cifar10_cd.py:lpips,smoke`). Every recipe accepts `smoke`, which keeps the recipe's
method, distance, weighting and optimizer but runs a few steps of a tiny network on the
embedded digits dataset (8×8×1, built from scikit-learn on first use: no download), so it needs no
accelerator and no prepared data. The network becomes a tiny residual MLP (class-conditional where the
recipe is): its iCT step compiles in ~3–4 CPU seconds, where the 755k-parameter digits UNet's takes 15–19 and
a 3.5M-parameter NCSN++ (CIFAR-10's structure at nf 32) ~52 (bench/results/compile_time_cpu.md); a conv net
in each of the ~18 smokes would add minutes to the default test tier, whose budget has ~15 s left. The
recipes' own network families train on the embedded 32×32×3 colour digits in configs/digits.py:color_ncsnpp
and :color_adm (the slow tier runs both through the loop).
"""
from __future__ import annotations

import math

import ml_collections

# EDM's σ range and ρ as plain numbers (a config must not import cmjax, which starts JAX and TensorFlow);
# tests/test_configs.py checks them against cmjax.parameterization and cmjax.schedules.
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

# Smoke runs: steps, global batch (a multiple of 8 virtual CPU devices) and images per sample grid.
SMOKE_STEPS = 8  # iCT needs K >= 8 for its 8 curriculum stages (K′ = ⌊K/8⌋ >= 1)
SMOKE_BATCH = 16
SMOKE_GRID_IMAGES = 8


def variants(arg: str | None, allowed: tuple[str, ...], recipe: str) -> set[str]:
    """The set of variants in `arg` ("lpips,smoke"); an unknown one lists the recipe's variants."""
    chosen = {part.strip() for part in (arg or "").split(",") if part.strip()}
    unknown = sorted(chosen - set(allowed))
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown} of configs/{recipe}.py; it has {sorted(allowed)}, "
                         f"comma-separated (e.g. configs/{recipe}.py:{','.join(allowed[:2])}).")
    return chosen


# The CM release's evaluation EMA rates (`--ema_rate` of scripts/launch.sh): ImageNet-64 and the EDM teachers,
# and the LSUN-256 consistency models.
CM_EMA_RATES_IMAGENET = (0.999, 0.9999, 0.9999432189950708)
CM_EMA_RATES_LSUN = (0.9999, 0.99994, 0.9999432189950708)
# The teacher EMA copy the ImageNet-64/LSUN CD (and CT `:init_teacher`) students use. openai's file
# `edm_imagenet64_ema.pt` does not name its rate; 0.9999432189950708 = 0.5^(4096/50e6), EDM's 50-Mimg half-life
# at the teacher's batch 4096, is the likely one: an inference, not confirmed (docs/fidelity.md).
CM_TEACHER_EMA_RATE = "0.9999432189950708"


def lpips_or_l2(chosen: set[str], recipe: str, lpips: str = "lpips") -> str:
    """The distance of a recipe with variants `lpips` (the default) and `l2`. `lpips` names the LPIPS flavour:
    "lpips" (VGG max pooling, the CIFAR-10 JAX release) or "lpips_avgpool" (piq's replace_pooling=True, the
    ImageNet-64/LSUN PyTorch release)."""
    if {"lpips", "l2"} <= chosen:
        raise ValueError(f"configs/{recipe}.py: choose one of the variants lpips and l2.")
    return "l2" if "l2" in chosen else lpips


def openai_ts_sigma(index: int, steps: int) -> float:
    """σ of openai's `--ts` index on its Karras grid of `steps` points counted from σmax (the CM
    release's two-step samplers: `--ts 0,22,39 --steps 40` is σmax then index 22)."""
    i = steps - 1 - index
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + i / (steps - 1) * (hi - lo)) ** RHO


def finish(config: ml_collections.ConfigDict, chosen: set[str]) -> ml_collections.ConfigDict:
    """The recipe as written, or its `smoke` shrink when `smoke` is among the variants."""
    return smoke(config) if "smoke" in chosen else config


def ema_rate_from_half_life(half_life_images: float, batch_size: int) -> float:
    """β = 0.5^(B / half-life): EDM's EMA half-life in images as a per-step rate."""
    return math.exp(math.log(0.5) * batch_size / half_life_images)


def ncsnpp_cifar10(dropout: float, fourier_scale: float = 16.0) -> ml_collections.ConfigDict:
    """NCSN++ of the CM CIFAR-10 release (56,395,651 parameters); iCT uses fourier_scale 0.02."""
    return ml_collections.ConfigDict({
        "name": "ncsnpp",
        "image_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "nf": 128,
        "ch_mult": (2, 2, 2),
        "num_res_blocks": 4,
        "attn_resolutions": (16,),
        "dropout": dropout,
        "conditional": True,  # time conditioning (the release's flag); the network has no class input
        "fourier_scale": fourier_scale,
        "resblock_type": "biggan",
        "fir": True,
        "fir_kernel": (1, 3, 3, 1),
        "skip_rescale": True,
        "progressive": "none",
        "progressive_input": "residual",
        "progressive_combine": "sum",
        "init_scale": 0.0,
        "dtype": "float32",  # the JAX release trained in float32
        "remat": False,
        "attention_impl": "xla",  # an implementation choice, not a setting of the release (docs/performance.md)
    })


def adm_unet(image_size: int, dropout: float, *, num_classes: int) -> ml_collections.ConfigDict:
    """openai's ADM UNet as the CM release configures it: ImageNet-64 (192 ch, mult 1,2,3,4, 3 blocks,
    scale-shift norm, 1000 classes: 295,899,267 parameters) or LSUN-256 (256 ch, mult 1,1,2,2,4,4,
    2 blocks, no scale-shift: 526,304,771). Both: attention at 32/16/8 with 64 channels per head,
    resblock up/down. bfloat16 compute is the TPU counterpart of the release's fp16."""
    lsun = image_size == 256
    return ml_collections.ConfigDict({
        "name": "unet",
        "image_size": image_size,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 256 if lsun else 192,
        "channel_mult": (1, 1, 2, 2, 4, 4) if lsun else (1, 2, 3, 4),
        "num_res_blocks": 2 if lsun else 3,
        "attention_resolutions": (32, 16, 8),
        "num_head_channels": 64,
        "use_scale_shift_norm": not lsun,
        "resblock_updown": True,
        "dropout": dropout,
        "num_classes": num_classes,
        "dtype": "bfloat16",
        "remat": False,
        "attention_impl": "xla",  # an implementation choice, not a setting of the release (docs/performance.md)
    })


def latent_dit(depth: int, width: int, heads: int, patch: int, **extra) -> ml_collections.ConfigDict:
    """cmjax's DiT on the 32×32×4 SD-VAE latents of 256×256 ImageNet, class-conditional (1000 classes) with the
    null label, no dropout, bfloat16 matmuls; `extra` adds DiT fields (velocity_head, label_dropout, learn_sigma)."""
    return ml_collections.ConfigDict({
        "name": "dit", "image_size": 32, "in_channels": 4, "out_channels": 4, "depth": depth, "hidden_size": width,
        "num_heads": heads, "patch_size": patch, "num_classes": 1000, "null_label": True, "dropout": 0.0,
        **extra, "dtype": "bfloat16", "attention_impl": "xla"})


def sized_variants(arg: str | None, sizes, recipe: str, default_size: str = "xl2") -> tuple[set[str], str]:
    """(the variants in `arg`, the one network size among them) of a recipe whose variants are its `sizes` and
    `smoke`; `default_size` when no size is named."""
    chosen = variants(arg, (*sizes, "smoke"), recipe)
    picked = [s for s in sizes if s in chosen] or [default_size]
    if len(picked) > 1:
        raise ValueError(f"configs/{recipe}.py takes one size, got {picked}.")
    return chosen, picked[0]


def _tiny_model(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The residual MLP of configs/digits.py at 32 wide (about 12k parameters), class-conditional where the
    recipe's network is, with the recipe's dropout; a DiT recipe's is a one-block DiT 32 wide (patch 2).
    Convolutional networks cost 4–15× the MLP's compile (module docstring); the full-size networks are checked by
    shape in tests/test_recipes.py."""
    conditional = bool(model.get("num_classes"))
    # A transformer recipe keeps a (one-block, 32-wide) transformer; iMF's v-head is one more block.
    if model.get("name") == "dit":
        return ml_collections.ConfigDict({
            "name": "dit", "image_size": 8, "in_channels": 1, "out_channels": 1, "depth": 1, "hidden_size": 32,
            "num_heads": 2, "patch_size": 2, "num_classes": 10 if conditional else 0,
            "null_label": bool(model.get("null_label")), "logvar_head": bool(model.get("logvar_head")),
            "velocity_head": bool(model.get("velocity_head")), "velocity_head_depth": 1,
            "label_dropout": float(model.get("label_dropout", 0.0)),
            "dropout": float(model.get("dropout", 0.0)), "dtype": "float32", "remat": False})
    tiny = ml_collections.ConfigDict({
        "name": "mlp", "hidden_dim": 32, "num_layers": 1, "time_embed_dim": 16,
        "num_classes": 10 if conditional else 0,  # digits has 10 classes
        "dropout": float(model.get("dropout", 0.0)), "dtype": "float32", "remat": False,
    })
    for head in ("logvar_head", "velocity_head", "null_label"):  # heads and label rows the objective needs
        tiny[head] = bool(model.get(head))
    return tiny


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A few CPU steps of the recipe's method, optimizer and EMA with a tiny MLP on the embedded digits data:
    no periodic evaluation (the end-of-run sample grids still run), one EMA rate, a checkpoint at the end."""
    config.model = _tiny_model(config.model)
    config.data.name = "digits"
    config.data.shuffle_buffer = 256
    config.data.random_flip = False
    config.batch_size = SMOKE_BATCH
    config.total_steps = SMOKE_STEPS
    config.optim.warmup_steps = min(config.optim.warmup_steps, 1)
    if config.optim.decay == "inverse_sqrt":
        config.optim.decay_start_step = 1
    config.log_every = 1
    config.ckpt_every = SMOKE_STEPS
    config.eval_every = 0
    config.ema_rates = config.ema_rates[:1]
    config.teacher.ema_rate = ""  # a smoke teacher keeps only its first EMA rate
    config.sample.num_images = SMOKE_GRID_IMAGES
    config.sample.metric_samples = 0
    return config
