"""Subprocess body for tests/test_evaluate.py: one process of a 2-process (4 CPU devices each) evaluation.

  python tests/_eval_worker.py CONFIG.json WORKDIR PORT PROCESS_ID OUTPUT_DIR

joins jax.distributed on 127.0.0.1:PORT (gloo collectives), runs `evaluate.evaluate_checkpoint` and
`evaluate.sample_checkpoint` on the checkpoint in WORKDIR with the config in CONFIG.json, and writes what this
process got back to OUTPUT_DIR/result_<PROCESS_ID>.json.
"""
import json
import os
import sys


def main(config_path: str, workdir: str, port: int, process_id: int, output: str) -> None:
    import jax
    import ml_collections

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from cmjax import evaluate

    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    metrics = evaluate.evaluate_checkpoint(config, workdir, output=os.path.join(output, "eval"))
    samples = evaluate.sample_checkpoint(config, workdir, num_samples=24, output=os.path.join(output, "samples"))
    with open(os.path.join(output, f"result_{process_id}.json"), "w") as f:
        json.dump({"metrics": metrics, "samples": samples, "process_count": jax.process_count(),
                   "device_count": jax.device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
