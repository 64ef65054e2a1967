"""cmjax command line. This file is intentionally kept short: parse, initialise, dispatch.

  python -m cmjax.main --config=configs/digits.py --workdir=/tmp/digits [--config.batch_size=256]
  python -m cmjax.main --config=configs/digits.py --workdir=/tmp/digits --mode=sample [--step=3000]
  python -m cmjax.main --config=configs/digits.py --workdir=/tmp/digits --mode=eval [--num_samples=50000]
  python -m cmjax.main --config=... --workdir=RUN --mode=export --format=diffusers --output=DIR [--ema_rate=0.9999]
  python -m cmjax.main --config=... --workdir=NEW_RUN --mode=import --format=openai --input=cd_imagenet64_l2.pt
  python -m cmjax.main --config=... --workdir=DIR --mode=compile   # memory and FLOPs of the step, no training
  python -m cmjax.main --config=... --workdir=DIR --mode=compile --topology=v5p:2x2x2   # for a TPU slice, here
  python -m cmjax.main --config=... --workdir=RUN --mode=edit --edit_task=inpaint --edit_images=a.png --edit_masks=m.png
  python -m cmjax.main --config=... --workdir=DIR --mode=encode --config.latent.vae=VAE_FOLDER   # latent dataset

Each mode is one library function (MODES below); this file only parses flags and dispatches.

On several hosts every process runs the same command; `jax.distributed.initialize()` is called when
the environment says the job spans processes (Cloud TPU pod slices, SLURM, or the explicit flags).
"""
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples (local or gs://).")
# mode -> "module:function", each called as function(config, workdir, **options_of_that_mode).
MODES = {
    "train": "cmjax.train:train_and_evaluate",
    "sample": "cmjax.evaluate:sample_checkpoint",
    "eval": "cmjax.evaluate:evaluate_checkpoint",
    "export": "cmjax.interop:export_checkpoint",
    "import": "cmjax.interop:import_checkpoint",
    "compile": "cmjax.aot:compile_report",
    "edit": "cmjax.editing:edit_checkpoint",
    "encode": "cmjax.data.latents:encode_dataset",
}
flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
flags.DEFINE_integer("step", None, "sample/eval/export: checkpoint step (default: the newest).")
flags.DEFINE_string("ema_rate", None, "sample/eval/export: EMA rate of the parameters (default: the config's "
                    "first; 'online' for the raw parameters).")
flags.DEFINE_integer("num_samples", None, "sample/eval: number of samples per sampler (default: from the config).")
flags.DEFINE_enum("format", "diffusers", ["diffusers", "openai"], "export/import: checkpoint layout.")
flags.DEFINE_string("output", None, "sample/eval/export: output file or directory (default: inside --workdir).")
flags.DEFINE_string("input", None, "import: the checkpoint to import (a diffusers folder, or an openai .pt / "
                    ".safetensors file).")
flags.DEFINE_string("topology", None, "compile: a TPU slice to compile the step for on this machine, e.g. "
                    "v5p:2x2x2 or v5e:4x4 (needs libtpu: pip install 'cmjax[tpu]').")
# --mode=edit (cmjax/editing.py, docs/editing.md); each is passed without its "edit_" prefix.
flags.DEFINE_string("edit_task", None, "edit: inpaint | colorize | superres | denoise | interpolate | stroke.")
flags.DEFINE_list("edit_images", None, "edit: input PNG files.")
flags.DEFINE_list("edit_masks", None, "edit (inpaint): mask PNG files, white = pixels to generate; one or one "
                  "per image.")
flags.DEFINE_list("edit_labels", None, "edit: class labels of a conditional model (one, or one per input).")
flags.DEFINE_list("edit_ts", None, "edit: openai-style ts indices into an --edit_steps-point Karras grid, ending "
                  "at steps−1 (default per task).")
flags.DEFINE_integer("edit_steps", None, "edit: size of the Karras grid --edit_ts indexes (default 40).")
flags.DEFINE_float("edit_sigma", None, "edit (denoise): the noise level σ of the inputs.")
flags.DEFINE_bool("edit_add_noise", None, "edit (denoise): noise the (clean) inputs at --edit_sigma first.")
flags.DEFINE_integer("edit_factor", None, "edit (superres): the upscaling factor (default 2).")
flags.DEFINE_integer("edit_frames", None, "edit (interpolate): images per pair of noises (default 8).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
flags.DEFINE_bool("verbose", False, "Show the Python traceback of a user error (bad config, path or file) too.")
flags.mark_flags_as_required(["config", "workdir"])
EDIT_FLAGS = [name for name in FLAGS if name.startswith("edit_")]


def _initialize_distributed() -> None:
    import jax

    if FLAGS.coordinator_address:
        if jax.config.jax_platforms in ("cpu", None) or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize()  # cluster auto-detection (Cloud TPU, SLURM, explicit env)


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO records from Orbax and TFDS internals, which would otherwise drown the training log."""

    def filter(self, record):
        noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
        return record.levelno > logging.logging.INFO or not any(part in record.pathname for part in noisy)


def main(argv):
    if len(argv) > 1:
        _exit_with_message(f"Unexpected arguments: {argv[1:]} (flags are --name=value).")
    options = _mode_options(FLAGS.mode)  # flag errors before any distributed set-up
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _initialize_distributed()
    import jax

    logging.info("JAX process %d/%d, %d local / %d global devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    from cmjax import errors
    from cmjax import workdir as workdir_lib

    try:
        workdir_lib.enable_compilation_cache(FLAGS.config, FLAGS.workdir)
        result = _mode_function(FLAGS.mode)(FLAGS.config, FLAGS.workdir, **options)
    except errors.UserError as err:
        if FLAGS.verbose:
            raise
        _exit_with_message(str(err))
    if jax.process_index() == 0:
        _report(FLAGS.mode, FLAGS.workdir, result)


def _mode_function(mode: str):
    import importlib

    module_name, function_name = MODES[mode].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _mode_options(mode: str) -> dict:
    """The flags a mode takes; flags given to a mode that ignores them are errors, not silently dropped."""
    accepted = {
        "train": [], "compile": ["topology"], "encode": [],
        "sample": ["step", "ema_rate", "num_samples", "output"],
        "eval": ["step", "ema_rate", "num_samples", "output"],
        "export": ["step", "ema_rate", "format", "output"],
        "import": ["format", "input"],
        "edit": ["step", "ema_rate", "num_samples", "output", *EDIT_FLAGS],
    }[mode]
    ignored = [name for name in ("step", "ema_rate", "num_samples", "output", "input", "topology", *EDIT_FLAGS)
               if name not in accepted and FLAGS[name].present]
    if ignored:
        _exit_with_message(f"--mode={mode} does not take --{', --'.join(ignored)}.")
    if mode == "import" and not FLAGS.input:
        _exit_with_message("--mode=import needs --input=PATH (a diffusers folder or an openai .pt/.safetensors).")
    if mode == "export" and not FLAGS.output:
        _exit_with_message("--mode=export needs --output=DIR.")
    return {name.removeprefix("edit_"): FLAGS[name].value for name in accepted}


def _report(mode: str, workdir: str, result) -> None:
    if mode == "train":
        print(f"\nFinal metrics: { {k: round(v, 4) for k, v in result.items() if isinstance(v, float)} }")
        print(f"Checkpoints:  {os.path.join(workdir, 'checkpoints')}")
        print(f"Metrics:      {os.path.join(workdir, 'metrics.jsonl')}  (TensorBoard: tensorboard --logdir {workdir})")
        print(f"Sample grids: {os.path.join(workdir, 'samples')}")
    elif isinstance(result, dict):
        for key, value in result.items():
            print(f"{key}: {_number(value) if isinstance(value, float) else value}")
    elif result is not None:
        print(result)

def _number(value: float):
    """Four decimals, or four significant digits for small values (a compiler's step-time estimate)."""
    return round(value, 4) if value == 0 or abs(value) >= 1e-3 else float(f"{value:.4g}")


def _exit_with_message(message: str) -> None:
    """A user error: its message alone on stderr (no traceback; --verbose shows one), exit status 2."""
    print(f"cmjax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, with errors in the config file or a --config.* override as one message."""
    try:
        args = FLAGS(argv)
        FLAGS.config.get("seed")  # a config file that failed to load raises here, not in FLAGS(argv)
        return args
    except OSError as err:  # the config file is missing or unreadable
        if "--verbose" in argv:
            raise
        path = argv_config(argv).partition("=")[2].split(":")[0]
        if path and not os.path.isfile(path):
            _exit_with_message(f"{argv_config(argv)}: no such config file {path!r} (recipes are in configs/).")
        _exit_with_message(f"{argv_config(argv)}: " + " ".join(str(err).split()))
    except flags.Error as err:
        if "--verbose" in argv:
            raise
        text = str(err)
        if "Error whilst parsing config file" in text:  # the config's own exception, inside a traceback text
            last = [line.strip() for line in text.splitlines() if line.strip()][-1]
            _exit_with_message(f"{argv_config(argv)}: {last}")
        _exit_with_message(text.splitlines()[0] if text else repr(err))
    except (AttributeError, KeyError) as err:  # an override of a key the (locked) config does not have
        if "--verbose" in argv:
            raise
        text = err
        while isinstance(text, BaseException):  # AttributeError(KeyError("'key'\nDid you mean ...?"))
            text = text.args[0] if text.args else ""
        first, _, hint = str(text).partition("\n")
        key = first.strip("\"'")
        given = [a for a in argv[1:] if re.match(rf"--config(\.\w+)*\.{re.escape(key)}(=|$)", a)]
        hint = f" {hint.strip()}" if hint.strip() else ""
        _exit_with_message(f"{given[0] if given else key!r}: the config has no key {key!r}.{hint} Every key is "
                           "in configs/default.py (method settings in config.method.<name>).")
    except Exception as err:  # the config file itself raised while loading: its message is the user's to act on
        if "--verbose" in argv:
            raise
        _exit_with_message(f"{argv_config(argv)}: {type(err).__name__}: {err}")


def argv_config(argv) -> str:
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    return f"--config={given[0]}" if given else "--config"


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
