"""iMF's guidance as conditioning on the embedded digits: one class-conditional network, sampled at many ω.

improved MeanFlow (iMF §5) trains one network for every classifier-free guidance scale ω and guidance interval
(drawn per sample, fed to the network: `config.method.meanflow.guidance = "conditioned"`), with the auxiliary
v-head (`config.model.velocity_head`). This bench trains, with the same steps and settings otherwise,
  - "meanflow": class-conditional MeanFlow, unguided (labels dropped 10 % to the null label, guidance "none"),
  - "imf": iMF (guidance "conditioned", tangent "predicted", v-head, r = t for half of each batch),
on configs/digits.py's MLP, then samples both in one step for labels 0–9 and scores each sampler with the in-repo
digit classifier: how often it names the class the sample was asked for (label agreement), its confident
fraction, and the classifier-feature Fréchet distance to the training images. Guidance that works raises the
label agreement with ω from one network, where the unguided run has a single value.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \
      python bench/imf_guidance.py --steps 8000 --out bench/results/imf_guidance_cpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import quality, throughput  # noqa: E402

OMEGAS = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
SAMPLES = 4096


def run_config(variant: str, steps: int):
    """configs/digits.py with MeanFlow (bench/quality.py's digits MeanFlow), class-conditional, as `variant`."""
    from cmjax import methods

    config = quality.digits_method_config("meanflow", steps, "")
    config.model.num_classes = 10
    config.model.null_label = True
    if variant == "imf":
        methods.select(config, "meanflow", guidance="conditioned", tangent="predicted", equal_fraction=0.5)
        config.model.velocity_head = True
    elif variant != "meanflow":
        raise ValueError(f"Unknown variant {variant!r}.")
    return config


def score(workdir: str, seed: int, guidances) -> dict:
    """Label agreement, confident fraction and Fréchet of SAMPLES 1-step samples per guidance (None: unguided)."""
    from cmjax import evaluate, models, sharding
    from cmjax import workdir as workdir_lib
    from cmjax.metrics import digits as digits_metric

    config = workdir_lib.read_run_config(workdir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
    module, params, config, _ = workdir_lib.load_params(workdir, mesh, ema_rate=quality.DIGITS_EMA, config=config)
    classifier = digits_metric.train_classifier(data_dir=config.data.data_dir)
    reference = digits_metric.reference_images("train", data_dir=config.data.data_dir)
    results = {}
    for guidance in guidances:
        images, labels = evaluate.generate(module, params, jax.random.key(seed), mesh=mesh, num_images=SAMPLES,
                                           image_shape=models.image_shape(config), sigmas=[1.0], num_classes=10,
                                           parameterization_kind="meanflow", guidance=guidance)
        x = evaluate.to_uint8(images) / 127.5 - 1.0
        q = digits_metric.sample_quality(classifier, x, reference)
        agreement = float(np.mean(classifier.probabilities(x).argmax(-1) == np.asarray(labels)))
        results["unguided" if guidance is None else f"omega {guidance[0]:g} on [{guidance[1]:g}, {guidance[2]:g}]"] = {
            "agreement": agreement, "confident": q["confident_fraction"], "frechet": q["frechet"]}
    return results


def report(results: dict, args, loads) -> str:
    lines = ["# iMF's guidance as conditioning on the embedded digits (bench/imf_guidance.py)", "",
             f"Machine: {throughput.device_description()}, no accelerator; {throughput.load_verdict(loads)}",
             f"Versions: {throughput.versions()}.",
             f"Command: `python bench/imf_guidance.py --steps {args.steps} --seed {args.seed}` (one XLA CPU device).",
             f"Each run: configs/digits.py's MLP, class-conditional (10 classes + the null label), {args.steps} steps, "
             f"EMA {quality.DIGITS_EMA}; {SAMPLES} one-step samples per row, labels uniform over 0–9, scored by the "
             "in-repo digit classifier (label agreement: it names the class the sample was asked for).", "",
             "| run | sampler | label agreement | confident | Fréchet | train s |", "|---|---|---|---|---|---|"]
    for run, r in results.items():
        for sampler, q in r["scores"].items():
            lines.append(f"| {run} | {sampler} | {q['agreement']:.3f} | {q['confident']:.3f} | {q['frechet']:.2f} "
                         f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workroot", default="/tmp/cmjax_imf_guidance")
    parser.add_argument("--variants", default="meanflow,imf")
    parser.add_argument("--score_only", action="store_true", help="score finished runs in --workroot")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    from cmjax import train

    loads = [throughput.one_minute_load()]
    results = {}
    for variant in args.variants.split(","):
        workdir = os.path.abspath(os.path.join(args.workroot, variant))
        start = time.time()
        if not args.score_only:
            train.train_and_evaluate(run_config(variant, args.steps), workdir)
        seconds = time.time() - start
        loads.append(throughput.one_minute_load())
        guidances = [None] if variant == "meanflow" else [(w, 0.0, 1.0) for w in OMEGAS] + [(2.0, 0.2, 0.7)]
        results[variant] = {"train_seconds": seconds, "scores": score(workdir, args.seed, guidances)}
        print(json.dumps({variant: results[variant]}), flush=True)
    loads.append(throughput.one_minute_load())
    text = report(results, args, loads)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
