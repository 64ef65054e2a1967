"""Subprocess body for tests/test_data_latents.py: one of 2 jax.distributed processes (4 CPU devices each) running
`latents.encode_dataset` of the digits latents.

  _latents_worker.py PORT PROCESS_ID DATA_DIR VAE_FOLDER WORKDIR SPLIT CHUNK_SIZE BATCH_SIZE
"""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    port, process_id, data_dir, vae_folder, workdir, split, chunk, batch = sys.argv[1:]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    from cmjax.data import latents
    from configs import digits as digits_config

    config = digits_config.get_config("smoke")
    config.data.name, config.data.data_dir, config.data.split = "digits_latents", data_dir, split
    config.data.random_flip = True
    config.latent.vae, config.latent.chunk_size, config.latent.batch_size = vae_folder, int(chunk), int(batch)
    result = latents.encode_dataset(config, workdir)
    assert result["examples"] == 40, result
    jax.distributed.shutdown()
