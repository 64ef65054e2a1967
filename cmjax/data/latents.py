"""Encode once, train on latents: a TFDS image dataset → the VAE posterior of every image → a TFDS dataset.

`--mode=encode` (`encode_dataset`): the pixel split `config.data.split` of the latent dataset's source, in file
order, chunk by chunk (`config.latent.chunk_size` examples). Every process reads its share of a chunk's images,
the shares become one global batch (`jax.make_array_from_process_local_data`), one jitted encode sharded over the
mesh computes the posterior (mean, std) of each image, and of its mirror image where `config.data.random_flip`
asks for flips, the rows are gathered and process 0 writes the chunk as one .npz in WORKDIR/chunks/ (temp name,
then rename: a chunk file that exists is complete). A killed encode restarted with the same command continues at
the first missing chunk, and the dataset is the same. When every chunk is there, process 0 builds the TFDS
dataset `latent_images/<name>` in `config.data.data_dir` from them (`LatentImages`, which reads the chunks as its
manual dir); its metadata records the VAE (folder, parameter fingerprint, scaling) and the source.

What is stored is the *unscaled* posterior (mean, std = exp(logvar/2)), as the MeanFlow release stores
`concatenate(latent_dist.mean, latent_dist.std)` per image (Gsunshine/meanflow utils/data_util.py
`compute_latent_dataset`, read in its mirror rese1f/meanflow) and EDM2 (NVlabs/edm2 training/encoders.py
`StabilityVAEEncoder._run_vae_encoder`), the dataset tool REPA reuses. Training draws z = mean + std·ε afresh at
every step and scales it, as MeanFlow's train step does (`LatentManager.cached_encode`: `LatentDist(cached).sample
(rng)·0.18215`; EDM2 `encode_latents`): here inside tf.data, keyed by the stream position like the flips, so a
resumed run draws the same ε (`cmjax.data.pipeline`). The x-flip variant is the latent of the mirrored *image*
(a mirrored latent is not the latent of a mirrored image); the pipeline picks variant 0 or 1 with the same coin
that flips pixel images. (The MeanFlow release trains without flips: its `LatentDataset(use_flip=True)` returns
the stored latent unchanged, and the encode reads unflipped crops.)

The VAE is `config.latent.vae`, a diffusers `AutoencoderKL` folder (`cmjax.interop.vae.load_autoencoder`; the
SD-VAE once downloaded, or a small one `save_autoencoder` wrote). Training, sampling and evaluation read the VAE
the dataset records when `config.latent.vae` is "", and refuse a different one (`check_vae`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
import types
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cmjax import errors, sharding
from cmjax.data import datasets, pipeline

CHUNK_DIR = "chunks"  # WORKDIR/chunks/chunk_<first>_<end>.npz
PLAN_FILE = "encode.json"  # WORKDIR/encode.json: what this workdir encodes; a restart must match it

# The embedded end-to-end run's autoencoder: cmjax.models.vae.SMALL_CONFIG for one grayscale channel (8×8 digits →
# 4×4×4 latents, the shape of `digits_latents`).
DIGITS_VAE = {"in_channels": 1, "out_channels": 1}


# ---------------------------------------------------------------------------------------------------------------
# The VAE: folder, identity, the check against a dataset.


def fingerprint(module, params) -> str:
    """sha256 of the network's diffusers config and every parameter (float32 bytes, in sorted path order)."""
    from cmjax.interop import vae as interop_vae

    digest = hashlib.sha256(json.dumps(interop_vae.diffusers_config(module), sort_keys=True).encode())
    flat = sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0]))
    for path, leaf in flat:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()


def load_vae(folder: str) -> tuple[Any, Any, dict[str, Any]]:
    """(module, params, identity) of the diffusers AutoencoderKL folder `folder`; identity = {folder,
    fingerprint, scaling_factor, shift_factor}, what a latent dataset's metadata records."""
    from cmjax.interop import vae as interop_vae

    module, params = interop_vae.load_autoencoder(os.path.expanduser(folder))
    identity = {"folder": os.path.abspath(os.path.expanduser(folder)), "fingerprint": fingerprint(module, params),
                "scaling_factor": float(module.scaling_factor),
                "shift_factor": None if module.shift_factor is None else float(module.shift_factor)}
    return module, params, identity


def check_vae(identity: Mapping[str, Any], recorded: Mapping[str, Any], dataset: str) -> None:
    """A VAE other than the one that encoded `dataset` is a ConfigError (its latents mean something else)."""
    if identity["fingerprint"] != recorded["fingerprint"]:
        raise errors.ConfigError(
            f"config.latent.vae={identity['folder']!r} is not the VAE that encoded dataset {dataset!r} (that was "
            f"{recorded['folder']!r}, fingerprint {recorded['fingerprint'][:12]}…, this one "
            f"{identity['fingerprint'][:12]}…): its decoder would not invert these latents. Set config.latent.vae='' "
            "to use the recorded VAE, or encode the dataset again with this one (--mode=encode).")


class LatentDecoder:
    """Scaled latents → pixels in [−1, 1] with the VAE of a run's latent dataset: `config.latent.vae`, or the
    folder the dataset records ("" ), checked against the dataset (`check_vae`). `decode(vae_params, z)` is
    traceable; `params` are replicated over the mesh, an argument of the caller's jit (never a constant)."""

    def __init__(self, config, mesh):
        recorded = pipeline.latent_metadata(config.data)["vae"]
        folder = config.latent.vae or recorded["folder"]
        self.module, params, self.identity = load_vae(folder)
        check_vae(self.identity, recorded, config.data.name)
        self.params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def decode(self, vae_params, z_model_bhwc):
        from cmjax.models import vae

        z = vae.from_model_latent(z_model_bhwc, self.identity["scaling_factor"], self.identity["shift_factor"])
        images = self.module.apply({"params": vae_params}, z, method=self.module.decode)
        return jnp.clip(images, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The TFDS dataset written from the chunk files.


@dataclasses.dataclass(eq=False)
class LatentConfig(tfds.core.BuilderConfig):
    """One latent dataset: its `plan` (what `encode_dataset` encodes) fixes features and metadata."""

    plan: dict[str, Any] = dataclasses.field(default_factory=dict)


class LatentImages(tfds.core.GeneratorBasedBuilder):
    """The VAE posterior (mean, std) of a pixel dataset's images, per image and x-flip variant, with labels."""

    VERSION = tfds.core.Version(pipeline.LATENT_VERSION)
    RELEASE_NOTES = {pipeline.LATENT_VERSION: "mean, std [variants, h, w, c] float32, label, id (source row)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The chunk files of `python -m cmjax.main --mode=encode` (WORKDIR/chunks)."
    code_path = epath.Path(__file__)  # as cmjax/data/digits.py: no importlib_resources lookup needed

    def _info(self) -> tfds.core.DatasetInfo:
        plan = self.builder_config.plan
        shape = (2 if plan["flips"] else 1, *plan["latent_shape"])
        label = tfds.features.ClassLabel(num_classes=plan["num_classes"]) if plan["num_classes"] else np.int64
        return self.dataset_info_from_configs(
            description=f"{plan['source']!r} {plan['source_split']!r} encoded by the VAE {plan['vae']['folder']}.",
            features=tfds.features.FeaturesDict({
                "mean": tfds.features.Tensor(shape=shape, dtype=np.float32),
                "std": tfds.features.Tensor(shape=shape, dtype=np.float32),
                "label": label,
                "id": np.int64,
            }),
            metadata=tfds.core.MetadataDict(plan),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {self.builder_config.plan["split"]: self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, chunk_dir: str):
        for first, end in chunk_plan(self.builder_config.plan):
            with tf.io.gfile.GFile(chunk_path(chunk_dir, first, end), "rb") as f:
                chunk = dict(np.load(io.BytesIO(f.read())))
            for i, index in enumerate(chunk["id"]):
                yield int(index), {"mean": chunk["mean"][i], "std": chunk["std"][i],
                                   "label": int(chunk["label"][i]), "id": int(index)}


def chunk_plan(plan: Mapping[str, Any]) -> list[tuple[int, int]]:
    """[first, end) row ranges of the split, `chunk_size` rows each (the last one shorter)."""
    n, size = int(plan["num_examples"]), int(plan["chunk_size"])
    return [(first, min(first + size, n)) for first in range(0, n, size)]


def chunk_path(chunk_dir: str, first: int, end: int) -> str:
    return os.path.join(chunk_dir, f"chunk_{first:010d}_{end:010d}.npz")


# ---------------------------------------------------------------------------------------------------------------
# Encoding.


def _source_rows(split: str, num_examples: int) -> tuple[str, int, int]:
    """(TFDS split name, first row, end row) of a split spec over one split ("train", "train[:96]", "train[10%:]")."""
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(
        {split.split("[")[0]: types.SimpleNamespace(num_examples=num_examples)})
    if len(parts) != 1:
        raise errors.ConfigError(f"config.data.split={split!r}: --mode=encode reads one contiguous part of one split "
                                 "(e.g. 'train' or 'train[:10%]'), not a union.")
    part = parts[0]
    return part.splitname, part.from_ or 0, num_examples if part.to is None else part.to


def _read_share(builder, spec, base: str, first: int, end: int, batch: int, data_config) -> Iterator[dict]:
    """Rows [first, end) of split `base` in file order as uint8 batches of `batch` (the last padded), with their
    row index (−1 for padding) and label."""
    empty = {"image": np.zeros((0, *spec.image_shape), np.uint8), "label": np.zeros((0,), np.int64)}
    if end > first:
        ds = builder.as_dataset(split=f"{base}[{first}:{end}]", shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(try_autocache=False))
        feature, preprocess = builder.info.features["image"], datasets.preprocess_fn(spec)
        conditional = bool(spec.num_classes)
        ds = ds.map(lambda ex: {"image": preprocess(feature.decode_example(ex["image"])),
                                "label": ex["label"] if conditional else tf.constant(0, tf.int64)},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch).prefetch(2).with_options(pipeline.pipeline_options(data_config,
                                                                                pure_python_step=spec.center_crop))
        batches = iter(tfds.as_numpy(ds))
    else:
        batches = iter(())
    row = first
    for _ in range(math.ceil(max(end - first, 0) / batch) if end > first else 0):
        got = next(batches, empty)
        n = len(got["image"])
        pad = batch - n
        yield {"image": np.concatenate([got["image"], np.zeros((pad, *spec.image_shape), np.uint8)]),
               "label": np.concatenate([got["label"], np.zeros((pad,), np.int64)]).astype(np.int32),
               "id": np.concatenate([np.arange(row, row + n), -np.ones((pad,), np.int64)]).astype(np.int32)}
        row += n


def make_encoder(module, mesh, flips: bool):
    """jit(params, uint8 images [B, H, W, C]) → (mean, std) [B, V, h, w, c] float32 of the posterior q(z | x) of
    each image (V = 2: and of its mirror image), sharded over the mesh's batch axes like the images."""
    rows = sharding.batch_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=(rows, rows))
    def encode(params, images_uint8):
        x = pipeline.to_model_range(images_uint8)
        if flips:  # one call over both variants: [x; mirror(x)]
            x = jnp.concatenate([x, x[:, :, ::-1]])
        mean, logvar = module.apply({"params": params}, x, method=module.encode)
        std = jnp.exp(0.5 * logvar)
        split = lambda a: jnp.stack(jnp.split(a, 2), axis=1) if flips else a[:, None]  # noqa: E731
        return split(mean), split(std)

    return encode






def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()  # zip needs a seekable file; GFile (gs://) writes are not
    np.savez(buffer, **arrays)
    partial = f"{path}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(partial, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(partial, path, overwrite=True)  # a chunk file that exists is complete


def _check_plan(workdir: str, plan: dict[str, Any]) -> None:
    """Writes WORKDIR/encode.json, or checks that the one there describes the same encode."""
    path = os.path.join(workdir, PLAN_FILE)
    comparable = lambda p: {k: v for k, v in p.items() if k != "vae"} | {"vae": p["vae"]["fingerprint"]}  # noqa: E731
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
        if comparable(saved) != comparable(plan):
            differ = sorted(k for k in comparable(plan) if comparable(saved).get(k) != comparable(plan)[k])
            raise errors.ConfigError(
                f"{workdir!r} holds the chunks of another encode ({PLAN_FILE} differs in {differ}); resume it with its "
                "own config and VAE, or encode into a fresh --workdir.")
    elif jax.process_index() == 0:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(plan, f, indent=2)


def encode_dataset(config, workdir: str) -> dict[str, Any]:
    """`--mode=encode`: the latent dataset `config.data.name` from its pixel source (see the module docstring);
    every process calls it. Returns where the dataset is and what it holds."""
    spec = datasets.get_spec(config.data.name)
    if not spec.is_latent:
        latent = sorted(n for n, s in datasets.SPECS.items() if s.is_latent)
        raise errors.ConfigError(f"--mode=encode writes a latent dataset; config.data.name={config.data.name!r} is a "
                                 f"pixel dataset. Choose one of {latent} (its pixels are encoded).")
    if not config.latent.vae:
        raise errors.ConfigError("--mode=encode needs a VAE: set config.latent.vae to a diffusers AutoencoderKL folder "
                                 "(e.g. --config.latent.vae=/path/to/sd-vae-ft-ema; docs/latents.md).")
    data_config = pipeline.resolve_config(config.data)
    source = datasets.get_spec(spec.source)
    mesh = sharding.make_mesh(config.mesh)
    module, params, identity = load_vae(config.latent.vae)
    from cmjax.models import vae

    latent_shape = vae.latent_shape(module, source.image_shape[:2])
    if tuple(latent_shape) != tuple(spec.image_shape) or module.in_channels != source.image_shape[2]:
        raise errors.ConfigError(
            f"config.latent.vae={config.latent.vae!r} turns {source.name!r} images "
            f"{source.image_shape} into latents {latent_shape} (from {module.in_channels} channels), but dataset "
            f"{spec.name!r} holds {spec.image_shape} latents of {source.image_shape[2]}-channel images: use the VAE "
            "the dataset is defined for (docs/latents.md).")

    builder = pipeline.load_builder(source, data_config["data_dir"])
    split = data_config["split"]
    base = split.split("[")[0]
    if base not in builder.info.splits:
        raise errors.ConfigError(f"config.data.split={split!r}: {source.tfds_name!r} has splits "
                                 f"{sorted(builder.info.splits)}.")
    base, row0, row_end = _source_rows(split, builder.info.splits[base].num_examples)
    plan = {"dataset": spec.name, "source": source.name, "source_tfds": source.tfds_name, "source_split": split,
            "split": base, "num_examples": row_end - row0, "chunk_size": int(config.latent.chunk_size),
            "flips": bool(data_config["random_flip"]), "latent_shape": list(latent_shape),
            "num_classes": spec.num_classes, "vae": identity}

    existing = pipeline.find_latent_dir(spec, data_config["data_dir"])
    if existing is not None:  # encoded before: done if by this VAE, else refuse to mix
        recorded = tfds.builder_from_directory(existing).info.metadata
        check_vae(identity, recorded["vae"], spec.name)
        logging.info("Dataset %s is already encoded in %s.", spec.name, existing)
        return {"dataset": existing, "examples": int(recorded["num_examples"]), "chunks_encoded": 0}

    devices = sharding.batch_device_count(mesh)
    batch = int(config.latent.batch_size)
    if batch <= 0 or batch % devices:
        raise errors.ConfigError(f"config.latent.batch_size={batch} does not divide over the {devices} devices of the "
                                 f"mesh; choose a multiple of {devices}.")
    if plan["chunk_size"] <= 0:
        raise errors.ConfigError(f"config.latent.chunk_size={plan['chunk_size']} must be positive.")
    _check_plan(workdir, plan)
    chunk_dir = os.path.join(workdir, CHUNK_DIR)
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(chunk_dir)
    chunks = chunk_plan(plan)
    done = np.array([jax.process_index() == 0 and tf.io.gfile.exists(chunk_path(chunk_dir, a, b)) for a, b in chunks])
    done = np.asarray(sharding.from_process_0(done))

    encode = make_encoder(module, mesh, plan["flips"])
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    process, processes = jax.process_index(), jax.process_count()
    local_batch = batch // processes
    started, encoded = time.time(), 0
    logging.info("Encoding %s (%d images of %s %r, flips %s) with %s in %d chunks; %d already done.", spec.name,
                 plan["num_examples"], source.name, split, plan["flips"], identity["folder"], len(chunks),
                 int(done.sum()))
    for number, ((first, end), is_done) in enumerate(zip(chunks, done)):
        if is_done:
            continue
        share = math.ceil((end - first) / processes)  # rows per process; the same batch count on every process
        mine = (first + process * share, min(first + (process + 1) * share, end))
        parts = []
        local = _read_share(builder, source, base, row0 + mine[0], row0 + mine[1], local_batch, data_config)
        for _ in range(math.ceil(share / local_batch)):
            rows = next(local, None) or {"image": np.zeros((local_batch, *source.image_shape), np.uint8),
                                         "label": np.zeros((local_batch,), np.int32),
                                         "id": -np.ones((local_batch,), np.int32)}
            rows["id"] = np.where(rows["id"] >= 0, rows["id"] - row0, -1).astype(np.int32)
            arrays = sharding.host_local_to_global(rows, mesh)
            mean, std = encode(params, arrays["image"])
            parts.append(sharding.gather_to_hosts({"mean": mean, "std": std, "label": arrays["label"],
                                                   "id": arrays["id"]}))
        if process == 0:
            chunk = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            keep = chunk["id"] >= 0
            order = np.argsort(chunk["id"][keep], kind="stable")
            chunk = {k: v[keep][order] for k, v in chunk.items()}
            if not np.array_equal(chunk["id"], np.arange(first, end)):
                raise RuntimeError(f"Chunk [{first}, {end}) came back with rows {chunk['id'][:5]}…: a reading bug.")
            _save_npz(chunk_path(chunk_dir, first, end), chunk)
        encoded += end - first
        elapsed = time.time() - started
        remaining = sum(b - a for (a, b), d in zip(chunks[number + 1:], done[number + 1:]) if not d)
        logging.info("encode chunk %d/%d: rows [%d, %d)  %.1f img/s  ETA %ds", number + 1, len(chunks), first, end,
                     encoded / max(elapsed, 1e-9), remaining * elapsed / max(encoded, 1))

    if process == 0:
        writer = LatentImages(config=LatentConfig(name=spec.name, plan=plan), data_dir=data_config["data_dir"])
        writer.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=chunk_dir, try_download_gcs=False))
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("cmjax_latents_written")
    path = pipeline.find_latent_dir(spec, data_config["data_dir"])
    logging.info("Wrote %s (%d examples) to %s.", spec.name, plan["num_examples"], path)
    return {"dataset": path, "examples": plan["num_examples"], "chunks_encoded": int(len(chunks) - done.sum())}
