"""cmjax's iCT train step against the same step in PyTorch on `diffusers.UNet2DModel`, run alternately.

Both sides train the same network from the same weights (moved across with `cmjax.interop.diffusers
.to_diffusers_state_dict`) on the same batch, with the same math: lognormal pair indices over the Karras
grid of N(k) points, z ~ N(0, I), online f_θ(x + σ_{i+1}z, σ_{i+1}) with gradients, target
f_sg(θ)(x + σ_i z, σ_i) without, consistency scalings c_skip/c_out/c_in, time input 250·ln σ,
pseudo-Huber with c = 0.00054·√d, weight 1/(σ_{i+1} − σ_i), then one Adam update. The online and target
calls share one dropout mask (JAX: one key; PyTorch: the RNG state restored before the target call).
cmjax runs its trainer's own step (`cmjax.train_step.make_train_step`, state donated), which also computes the
grad norm and the non-finite guard; no EMA on either side.

Before timing, an equivalence check: dropout 0, identical weights and identical inputs (x, z, pair
indices, N); the two losses (and the losses after one Adam update each) are printed with their difference.
Then the two steps alternate, window by window, and the ratio of median images/s is printed.

    .venv/bin/python bench/vs_pytorch.py --model imagenet64_adm_small --batch 8 --steps 3 --repeats 5
    .venv/bin/python bench/vs_pytorch.py --model imagenet64_adm --batch 64 --dtype bfloat16   # on a GPU
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# diffusers and torch before anything imports tensorflow (cmjax.data): imported after it, diffusers segfaults.
import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402

from cmjax import distances, methods, models, parameterization, schedules  # noqa: E402
from cmjax.data import pipeline  # noqa: E402
from cmjax.interop import diffusers as interop  # noqa: E402

UNET_MODELS = ("digits", "imagenet64_adm_small", "imagenet64_adm")


def torch_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchICT:
    """The iCT step on a diffusers UNet2DModel, same math and hyper-parameters as cmjax's `ict` objective."""

    def __init__(self, module, params, config, device, *, dtype: str = "float32", channels_last: bool = False,
                 compile_model: bool = False):
        self.torch = torch
        self.device = device
        self.model = diffusers.UNet2DModel(**interop.diffusers_unet2d_config(module))
        state_dict = {k: torch.from_numpy(np.array(v))
                      for k, v in interop.to_diffusers_state_dict(params, module).items()}
        self.model.load_state_dict(state_dict, strict=True)
        self.model.to(device).train()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        o = config.optim
        if o.optimizer != "adam" or o.warmup_steps or o.grad_clip_norm or o.decay != "constant":
            raise ValueError("The PyTorch side implements plain Adam (optim.optimizer='adam', no warmup/clip/decay).")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                          foreach=True)
        m = methods.settings(config)
        self.total_steps, self.s0, self.s1 = config.total_steps, m["s0"], m["s1"]
        self.p_mean, self.p_std = m["p_mean"], m["p_std"]
        self.huber_c = distances.ict_huber_c(models.image_shape(config))
        self.conditional = bool(config.model.get("num_classes"))
        self.step_count = 0

    # -- the math, mirrored from cmjax.schedules / parameterization / losses --------------------------------
    def karras_sigma(self, index, n):
        lo = parameterization.SIGMA_MIN ** (1.0 / schedules.RHO)
        hi = parameterization.SIGMA_MAX ** (1.0 / schedules.RHO)
        return (lo + index.float() / (n - 1.0) * (hi - lo)) ** schedules.RHO

    def num_scales(self, step: int) -> int:
        return int(schedules.ict_num_scales(step, self.total_steps, self.s0, self.s1))

    def sample_indices(self, batch: int, n: int):
        """Pair indices i ∈ [0, N−2] with p(i) ∝ erf((ln σ_{i+1} − Pm)/(√2 Ps)) − erf((ln σ_i − Pm)/(√2 Ps))."""
        torch = self.torch
        grid = self.karras_sigma(torch.arange(n, device=self.device), n)
        cdf = torch.erf((torch.log(grid) - self.p_mean) / (math.sqrt(2.0) * self.p_std))
        return torch.multinomial(cdf[1:] - cdf[:-1], batch, replacement=True)

    def consistency_fn(self, x, sigma, labels):
        """f(x, σ) = c_skip·x + c_out·F(c_in·x, 250·ln σ), float32 outside the network."""
        sd, smin = parameterization.SIGMA_DATA, parameterization.SIGMA_MIN
        s = sigma.view(-1, 1, 1, 1)
        c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
        c_out = sd * (s - smin) / self.torch.sqrt(s**2 + sd**2)
        c_in = 1.0 / self.torch.sqrt(s**2 + sd**2)
        t_in = 250.0 * self.torch.log(self.torch.clamp(sigma, min=float(np.finfo(np.float32).tiny)))
        x_in = (c_in * x).contiguous(memory_format=self.memory_format)
        if self.autocast_dtype is not None:
            with self.torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = self.forward(x_in, t_in, class_labels=labels).sample
        else:
            out = self.forward(x_in, t_in, class_labels=labels).sample
        return c_skip * x + c_out * out.float()

    def loss(self, x, z, index, n, labels):
        """The iCT loss; the target call reuses the online call's dropout mask (same RNG state)."""
        torch = self.torch
        sigma = self.karras_sigma(index, n)
        sigma_next = self.karras_sigma(index + 1, n)
        rng_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()
        online = self.consistency_fn(x + sigma_next.view(-1, 1, 1, 1) * z, sigma_next, labels)
        after = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()
        with torch.no_grad():
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(rng_state, self.device)
            else:
                torch.set_rng_state(rng_state)
            target = self.consistency_fn(x + sigma.view(-1, 1, 1, 1) * z, sigma, labels)
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(after, self.device)
        else:
            torch.set_rng_state(after)
        squared = torch.sum(torch.square(online - target).flatten(1), dim=1)
        per_sample = torch.sqrt(torch.clamp(squared + self.huber_c**2, min=1e-20)) - self.huber_c
        return torch.mean(per_sample / (sigma_next - sigma))

    def step(self, x, labels, z=None, index=None, n=None):
        """One train step; draws N(k), indices and z itself unless given (the equivalence check gives them)."""
        n = self.num_scales(self.step_count) if n is None else n
        index = self.sample_indices(x.shape[0], n) if index is None else index
        z = self.torch.randn_like(x) if z is None else z
        loss = self.loss(x, z, index, n, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return loss

    def run(self, x, labels, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step(x, labels)
        self.last_loss = float(loss.detach())  # synchronises a GPU
        return time.perf_counter() - start


def bench_config(model: str, batch: int, dtype: str, dropout: float | None, overrides: dict | None = None):
    return throughput.make_config(model, "ict", batch, dtype, optimizer="adam", learning_rate=1e-4, ema_rates=(),
                                  dropout=dropout, overrides=overrides)


def _perturbed_setup(model: str, batch: int, dtype: str, overrides: dict | None,
                     compile_step: bool = True):
    """A dropout-0 trainer step with non-zero weights everywhere (zero-initialised output layers would make the
    network output exactly 0), its objective, the images, labels and the key of `make_train_step` at step 0."""
    config = bench_config(model, batch, dtype, dropout=0.0, overrides=overrides)
    step = throughput.Step(config, donate=False, compile_step=compile_step)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: np.asarray(p) + np.float32(0.02) * rng.standard_normal(p.shape, np.float32),
                          step.state.params)
    step.state = step.state.replace(params=jax.tree.map(jnp.asarray, params),
                                    opt_state=jax.jit(step.optimizer.init)(params))
    module, objective = step.module, methods.objective_from_config(config)
    labels = step.batch["label"] if config.model.get("num_classes") else None
    x = pipeline.to_model_range(step.batch["image"])

    def network(p, x_in, t_in, dropout_key):
        return module.apply({"params": p}, x_in, t_in, labels, train=True, rngs={"dropout": dropout_key})

    loss_fn = jax.jit(lambda p: objective(network, p, x, jax.random.fold_in(jax.random.key(config.seed), 0), 0)[0])
    return config, step, loss_fn, x, labels


def _objective_draws(config, x):
    """The N(k), pair indices and z that cmjax's objective draws at step 0 (losses._discrete_consistency_loss)."""
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    index_key, noise_key, _ = jax.random.split(key, 3)
    m = methods.settings(config)
    n = int(schedules.ict_num_scales(0, config.total_steps, m["s0"], m["s1"]))
    index = schedules.sample_ict_indices(index_key, x.shape[0], n, m["s1"] + 1, m["p_mean"], m["p_std"])
    return n, index, jax.random.normal(noise_key, x.shape, jnp.float32)


def _to_torch(side, x, z, index, labels):
    nchw = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2)).to(side.device)  # noqa: E731
    tlabels = torch.from_numpy(np.array(labels)).long().to(side.device) if labels is not None else None
    return nchw(x), nchw(z), torch.from_numpy(np.array(index)).to(side.device), tlabels


def equivalence(model: str, batch: int, device_name: str = "cpu", overrides: dict | None = None) -> dict:
    """cmjax's iCT loss (its own objective) vs the PyTorch loss, dropout 0, same weights and inputs, float32.

    The PyTorch side is handed exactly the pair indices, N(k) and z that cmjax's objective draws from its key.
    Also compares the loss after one Adam update of each (cmjax's trainer step vs PyTorch's step), which
    checks gradients and the optimizer as well.
    """
    config, step, loss_fn, x, labels = _perturbed_setup(model, batch, "float32", overrides)
    n, index, z = _objective_draws(config, x)
    jax_loss = float(loss_fn(step.state.params))
    side = TorchICT(step.module, step.state.params, config, torch_device(device_name))
    tx, tz, tindex, tlabels = _to_torch(side, x, z, index, labels)
    torch_loss = float(side.step(tx, tlabels, z=tz, index=tindex, n=n).detach())
    step.state, _ = step.compiled(step.state, step.batch, None)  # one update each, then the same loss again
    jax_after = float(loss_fn(step.state.params))
    with torch.no_grad():
        torch_after = float(side.loss(tx, tz, tindex, n, tlabels))
    return dict(jax_loss=jax_loss, torch_loss=torch_loss, jax_after=jax_after, torch_after=torch_after,
                n=n, index=np.asarray(index).tolist())


def bf16_numerics(model: str, batch: int, device_name: str = "cpu") -> dict:
    """bfloat16 against float32 on the same weights and inputs (dropout 0): the iCT loss's relative error and the
    gradient's cosine similarity for cmjax, and the loss's relative error of PyTorch's bf16 autocast beside it."""
    config, step, loss32, x, labels = _perturbed_setup(model, batch, "float32", None, compile_step=False)
    params = step.state.params
    config16, _, loss16, _, _ = _perturbed_setup(model, batch, "bfloat16", None, compile_step=False)
    (l32, g32), (l16, g16) = jax.value_and_grad(loss32)(params), jax.value_and_grad(loss16)(params)
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g32)])
    flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g16)])
    cosine = float(jnp.dot(flat32, flat16) / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16)))
    n, index, z = _objective_draws(config, x)
    side32 = TorchICT(step.module, params, config, torch_device(device_name))
    side16 = TorchICT(step.module, params, config16, torch_device(device_name), dtype="bfloat16")
    tx, tz, tindex, tlabels = _to_torch(side32, x, z, index, labels)
    with torch.no_grad():
        t32, t16 = (float(s.loss(tx, tz, tindex, n, tlabels)) for s in (side32, side16))
    return dict(jax_rel=abs(float(l16) - float(l32)) / abs(float(l32)), grad_cosine=cosine,
                grad_norm_ratio=float(jnp.linalg.norm(flat16) / jnp.linalg.norm(flat32)),
                torch_rel=abs(t16 - t32) / abs(t32), jax_loss32=float(l32), torch_loss32=t32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imagenet64_adm_small", choices=UNET_MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--dropout", type=float, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="alternating windows per side (medians reported)")
    parser.add_argument("--torch_device", default="auto")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--channels_last", action="store_true", help="PyTorch in channels_last memory format")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the diffusers UNet")
    parser.add_argument("--skip_equivalence", action="store_true")
    parser.add_argument("--equivalence_model", default="", help="model of the equivalence check (default --model)")
    parser.add_argument("--numerics", action="store_true", help="also compare bfloat16 with float32 (loss, gradient)")
    parser.add_argument("--output", default="", help="also write the markdown report to this file")
    args = parser.parse_args()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch_device(args.torch_device)
    torch_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu, {torch.get_num_threads()} threads")
    lines = [f"# iCT train step, cmjax vs PyTorch: {args.model}, {args.dtype}, batch {args.batch}", "",
             f"- JAX device: {throughput.device_description()}",
             f"- PyTorch device: {torch_name}",
             f"- Versions: {throughput.versions()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
             f"- Command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
             f"- Load before: `{throughput.load_average()}`"]
    print("\n".join(lines), flush=True)

    if not args.skip_equivalence:
        eq = equivalence(args.equivalence_model or args.model, min(args.batch, 4), args.torch_device)
        lines += ["", f"Equivalence ({args.equivalence_model or args.model}, dropout 0, same weights, x, z, pair "
                      f"indices {eq['index']}, N = {eq['n']}; float32):", "",
                  "| | cmjax | PyTorch | |difference| | relative |", "|---|---:|---:|---:|---:|"]
        for label, a, b in (("loss", eq["jax_loss"], eq["torch_loss"]),
                            ("loss after one Adam step", eq["jax_after"], eq["torch_after"])):
            lines.append(f"| {label} | {a:.7g} | {b:.7g} | {abs(a - b):.3g} | {abs(a - b) / abs(a):.2g} |")
        print("\n".join(lines[-5:]), flush=True)

    if args.numerics:
        nm = bf16_numerics(args.equivalence_model or args.model, min(args.batch, 4), args.torch_device)
        lines += ["", f"bfloat16 vs float32 ({args.equivalence_model or args.model}, dropout 0, same weights and "
                      "inputs): cmjax loss relative error "
                      f"{nm['jax_rel']:.2e}, gradient cosine {nm['grad_cosine']:.5f}, gradient norm ratio "
                      f"{nm['grad_norm_ratio']:.4f}; PyTorch autocast loss relative error {nm['torch_rel']:.2e}."]
        print(lines[-1], flush=True)

    config = bench_config(args.model, args.batch, args.dtype, args.dropout)
    jax_step = throughput.Step(config)
    torch_step = TorchICT(jax_step.module, jax_step.state.params, config, device, dtype=args.dtype,
                          channels_last=args.channels_last, compile_model=args.torch_compile)
    images = pipeline.to_model_range(jax_step.batch["image"])
    tx = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()).to(device)
    tlabels = (torch.from_numpy(np.array(jax_step.batch["label"])).long().to(device)
               if config.model.get("num_classes") else None)
    start = time.perf_counter()
    torch_step.run(tx, tlabels, 1)
    torch_first = time.perf_counter() - start
    jax_step.run(1)
    torch_step.run(tx, tlabels, 1)

    jax_rates, torch_rates, loads = [], [], [throughput.one_minute_load()]
    for _ in range(args.repeats):
        jax_rates.append(args.batch * args.steps / jax_step.run(args.steps))
        torch_rates.append(args.batch * args.steps / torch_step.run(tx, tlabels, args.steps))
        loads.append(throughput.one_minute_load())
        print(f"  window: cmjax {jax_rates[-1]:.2f} images/s, PyTorch {torch_rates[-1]:.2f} images/s "
              f"(load {loads[-1]:.2f})", flush=True)
    jax_median, torch_median = statistics.median(jax_rates), statistics.median(torch_rates)
    lines += ["", f"Throughput ({args.repeats} alternating windows of {args.steps} steps each, after warm-up; "
                  f"dropout {config.model.dropout}):", "",
              "| | images/s (median) | windows | first step s |", "|---|---:|---|---:|",
              f"| cmjax | {jax_median:.2f} | {', '.join(f'{r:.2f}' for r in jax_rates)} "
              f"| {jax_step.lower_s + jax_step.compile_s:.1f} (lower + compile) |",
              f"| PyTorch | {torch_median:.2f} | {', '.join(f'{r:.2f}' for r in torch_rates)} | {torch_first:.1f} |",
              "", f"**Ratio cmjax ÷ PyTorch: {jax_median / torch_median:.2f}×** "
                  f"(per-window ratios: {', '.join(f'{a / b:.2f}' for a, b in zip(jax_rates, torch_rates))})",
              "", f"- Parameters: {jax_step.num_params:,}; last losses: cmjax {jax_step.last_loss:.4g}, "
                  f"PyTorch {torch_step.last_loss:.4g}",
              f"- Load after: `{throughput.load_average()}`",
              f"- {throughput.load_verdict(loads)}"]
    print("\n".join(lines[-10:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
