"""cmjax command line. This file is intentionally kept short: parse, initialise, dispatch.

  python -m cmjax.main --config=configs/digits.py --workdir=/tmp/digits [--config.batch_size=256]

On several hosts every process runs the same command; `jax.distributed.initialize()` is called when
the environment says the job spans processes (Cloud TPU pod slices, SLURM, or the explicit flags).
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples (local or gs://).")
flags.DEFINE_enum("mode", "train", ["train"], "What to do.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


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
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _initialize_distributed()
    import jax

    from cmjax import train

    logging.info("JAX process %d/%d, %d local / %d global devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    if FLAGS.mode == "train":
        final = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        if jax.process_index() == 0:
            workdir = FLAGS.workdir
            print(f"\nFinal metrics: { {k: round(v, 4) for k, v in final.items() if isinstance(v, float)} }")
            print(f"Checkpoints:  {os.path.join(workdir, 'checkpoints')}")
            print(f"Metrics:      {os.path.join(workdir, 'metrics.jsonl')}  (TensorBoard: tensorboard --logdir {workdir})")
            print(f"Sample grids: {os.path.join(workdir, 'samples')}")


if __name__ == "__main__":
    app.run(main)
