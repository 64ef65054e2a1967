"""iCT on the embedded digits dataset (8×8 grayscale, 1,437 training images): the `make demo` job.

  python -m cmjax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m cmjax.main --config=configs/digits.py:smoke --workdir=/tmp/digits_smoke   # a few CPU steps

No published numbers exist for this dataset; quality is measured by a digit classifier trained in-repo
(`cmjax/metrics/digits.py`): Fréchet distance in its feature space and the fraction of confidently
classified samples (target ≥ 80 % for 1-step samples, every class between 5 % and 15 %).
Sized for about 10 minutes on 2 CPU cores.
"""
from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.total_steps = 3000
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    if arg == "smoke":
        config.total_steps = 6
        config.batch_size = 16
        config.optim.warmup_steps = 2
        config.log_every = 2
        config.ckpt_every = 3
        config.eval_every = 0
        config.sample.num_images = 16
        config.sample.metric_samples = 0
        config.model.model_channels = 32
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/digits.py; use '' or 'smoke'.")
    return config
