"""The latent path on the embedded digits with a *trained* small autoencoder, through the command line.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \
      nice -n 10 .venv/bin/python bench/latent_digits.py --root=/tmp/latent_digits [--vae_steps=1500 --steps=6000]

1. `train_autoencoder`: `vae.SMALL_CONFIG` for one channel (8×8 → 4×4×4 latents) trained on the digits train split
   with a plain reconstruction loss on decode(z), z ~ q(z | x), plus a small KL term (β = 1e-4) that keeps the
   posterior a distribution; its scaling_factor is set so the scaled posterior means have std 0.5 (σ_data).
   Saved as a diffusers folder (`cmjax.interop.vae.save_autoencoder`).
2. `--mode=encode` of `digits_latents` (the whole train split, no flips: mirrored digits are not digits).
3. iCT of configs/digits.py (its MLP, curriculum and optimizer; `--steps` steps) on `digits_latents`, and the same
   budget on pixels beside it.
4. `--mode=eval` of both with the digit classifier (decoded samples for the latent run); the autoencoder's own
   reconstructions of the test split are scored too (the ceiling the latent run can reach).
Writes ROOT/latent_digits.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_autoencoder(images_uint8: np.ndarray, steps: int, batch: int = 128, seed: int = 0, beta: float = 1e-4):
    """(module, params): the small one-channel AutoencoderKL trained by Adam (2e-3) on ‖decode(z) − x‖² + β·KL."""
    from cmjax.data import latents
    from cmjax.models import vae

    module = vae.AutoencoderKL(**{**vae.SMALL_CONFIG, **latents.DIGITS_VAE})
    params = vae.init_params(module, jax.random.key(seed), images_uint8.shape[1:3])
    optimizer = optax.adam(2e-3)
    opt_state = optimizer.init(params)
    data = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1

    def loss_fn(p, x, key):
        mean, logvar = module.apply({"params": p}, x, method=module.encode)
        z = vae.posterior_sample(mean, logvar, key)
        recon = module.apply({"params": p}, z, method=module.decode)
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
        return jnp.mean(jnp.sum((recon - x) ** 2, axis=(1, 2, 3)) + beta * kl)

    @jax.jit
    def step(p, s, key):
        k1, k2 = jax.random.split(key)
        x = data[jax.random.randint(k1, (batch,), 0, data.shape[0])]
        loss, grads = jax.value_and_grad(loss_fn)(p, x, k2)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    key = jax.random.key(seed + 1)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        if i % 500 == 0 or i == steps - 1:
            print(f"autoencoder step {i}: loss {float(loss):.4f}", flush=True)
    mean, _ = module.apply({"params": params}, data, method=module.encode)
    module = module.clone(scaling_factor=float(0.5 / np.std(np.asarray(mean))))
    return module, params


def _cli(args, log):
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "cmjax.main", *args], cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(args)} failed ({code}); see {log}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/latent_digits")
    parser.add_argument("--vae_steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    from cmjax.data import digits
    from cmjax.interop import vae as interop_vae
    from cmjax.metrics import digits as digits_metric

    os.makedirs(args.root, exist_ok=True)
    data_dir, folder = os.path.join(args.root, "tfds"), os.path.join(args.root, "vae")
    digits.prepare(data_dir)
    result = {"load_before": os.getloadavg()}
    images, _ = digits.digits_uint8()
    split = digits.split_indices()
    started = time.time()
    module, params = train_autoencoder(images[split["train"]], args.vae_steps)
    result["vae_seconds"] = time.time() - started
    interop_vae.save_autoencoder(folder, params, module)
    test = jnp.asarray(images[split["test"]], jnp.float32) / 127.5 - 1
    mean, _ = module.apply({"params": params}, test, method=module.encode)
    recon = np.clip(np.asarray(module.apply({"params": params}, mean, method=module.decode)), -1, 1)
    classifier = digits_metric.train_classifier(data_dir=data_dir)
    reference = digits_metric.reference_images(split="train", data_dir=data_dir)
    quality = digits_metric.sample_quality(classifier, recon, reference)
    result["reconstruction"] = {"mse": float(np.mean((recon - np.asarray(test)) ** 2)),
                                "frechet": float(quality["frechet"]),
                                "confident_fraction": float(quality["confident_fraction"])}
    common = ["--config=configs/digits.py", "--config.mesh.data=1", f"--config.data.data_dir={data_dir}",
              f"--config.total_steps={args.steps}", f"--config.eval_every={args.steps}"]
    latent = common + ["--config.data.name=digits_latents"]
    started = time.time()
    _cli(latent + ["--mode=encode", f"--workdir={args.root}/encode", f"--config.latent.vae={folder}",
                   "--config.latent.batch_size=512"], os.path.join(args.root, "encode.log"))
    result["encode_seconds"] = time.time() - started
    for name, flags in (("latent", latent), ("pixel", common)):
        workdir = os.path.join(args.root, name)
        started = time.time()
        _cli(flags + [f"--workdir={workdir}"], os.path.join(args.root, f"train_{name}.log"))
        result[f"{name}_train_seconds"] = time.time() - started
        _cli(flags + [f"--workdir={workdir}", "--mode=eval", f"--num_samples={args.samples}"],
             os.path.join(args.root, f"eval_{name}.log"))
        with open(os.path.join(workdir, "eval", f"metrics_{args.steps:08d}.json")) as f:
            result[name] = json.load(f)
    result["load_after"] = os.getloadavg()
    with open(os.path.join(args.root, "latent_digits.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
