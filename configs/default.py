"""Every configuration key of cmjax, once, with its default and meaning. Recipes start from here.

  python -m cmjax.main --config=configs/default.py --workdir=/tmp/cmjax_default

The defaults train iCT on the embedded digits dataset (8×8, no download) with a small ADM UNet.
`config.model` holds exactly the fields of the network `config.model.name` selects
(`cmjax/models/`); `config.method` holds `name`, `teacher` and exactly the settings of the objective
`name` selects (`cmjax.losses.objective_settings(name)` lists them with their defaults).
"""
import ml_collections

from cmjax import optim
from cmjax.data import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # model init, noise and data order all derive from it
    config.batch_size = 128  # global, over all processes and devices
    config.total_steps = 3000  # optimizer steps; also K of the curricula (iCT, CT) unless the method sets it
    config.log_every = 50  # steps between metric writes (TensorBoard, stdout, metrics.jsonl)
    config.ckpt_every = 500  # steps between asynchronous checkpoints
    config.keep_checkpoints = 3  # newest checkpoints kept
    # Resume from this checkpoint step instead of the newest (-1: the newest). The checkpoints after it are
    # moved to workdir/checkpoints_set_aside/ (not deleted); applied once, so a restart with the same command
    # resumes from the newest again. See docs/troubleshooting.md.
    config.restore_step = -1
    # The newest checkpoint cannot be read back: False stops with a message naming it and the intact ones;
    # True resumes from the newest readable one with a warning and a "checkpoint_skipped" row in metrics.jsonl.
    config.restore_fallback = False
    config.eval_every = 1000  # steps between sample grids and quality metrics (0: only at the end)
    config.max_nonfinite_steps = 20  # consecutive skipped non-finite steps before training stops
    config.ema_rates = (0.999,)  # evaluation EMA rates of the parameters (iCT CIFAR-10: 0.99993)

    # Device mesh: batch over ("data", "fsdp"); parameters FSDP-sharded over "fsdp". -1 fills.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

    config.data = pipeline.default_config()  # keys documented in cmjax/data/pipeline.py

    config.model = ml_collections.ConfigDict({
        "name": "unet",  # unet | ncsnpp | mlp
        "image_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "model_channels": 32,
        "channel_mult": (1, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (4,),  # image resolutions that get self-attention
        "num_head_channels": 32,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "dropout": 0.1,
        "num_classes": 0,  # 0: unconditional
        "dtype": "float32",  # compute dtype; parameters stay float32 (bfloat16 on TPU)
        "remat": False,  # rematerialise each block in the backward pass (saves memory, costs FLOPs)
    })

    config.method = ml_collections.ConfigDict({
        "name": "ict",  # edm | cd | ct | ict | ect (cmjax/losses.py)
        "teacher": "",  # cd/ect: workdir of an EDM run (its newest checkpoint's first EMA rate)
        "s0": 10,
        "s1": 160,  # sized for a few thousand steps: N = 11, 21, 41, 81, 161
        "p_mean": -1.1,
        "p_std": 2.0,
        "distance": "pseudo_huber",  # l2 | l1 | pseudo_huber | lpips | lpips_avgpool (docs/lpips.md)
        # lpips*: the converted VGG16 weights (.npz); "" = ~/.cache/cmjax/lpips_vgg16.npz, written by
        # `python -m cmjax.metrics.lpips --convert`. Not an objective setting: train.py reads it once.
        "distance_weights": "",
        "weighting": "ict",
    })

    config.optim = optim.default_config()  # keys documented in cmjax/optim.py

    config.sample = ml_collections.ConfigDict({
        "num_images": 64,  # images in each sample grid
        "two_step_sigma": 0.8,  # the second noise level of the 2-step sampler
        "metric_samples": 512,  # samples per sampler for the digits quality metric (0: none)
    })

    # Evaluation (cmjax/evaluate.py): --mode=eval, and FID during training.
    config.eval = ml_collections.ConfigDict({
        "num_samples": 50_000,  # samples per sampler and EMA rate for --mode=eval (published FIDs use 50k)
        "batch_size": 512,  # global images per chunk (a multiple of the device count); the unit of resumption
        "metric": "auto",  # auto (digits: the digit classifier; other datasets: inception) | inception | digits
        "inception_weights": "~/.cache/cmjax/pt_inception-2015-12-05-6726825d.npz",  # python -m cmjax.metrics.inception
        "inception_size": 299,  # Inception input size; pytorch-fid's 299 (smaller, >= 75, only for tests)
        "reference": "train",  # TFDS split of config.data.name (statistics cached), or a .npz with mu and sigma
        "fid_during_training": 0,  # samples per sampler for FID/IS/precision/recall at each eval_every (0: off)
        "two_step_search": 0,  # samples per probe of the 2-step middle-time ternary search in --mode=eval (0: off)
        "search_steps": 40,  # Karras grid (openai --steps) whose indices the 2-step search walks
    })
    return config
