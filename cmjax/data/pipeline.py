"""TFDS -> tf.data -> per-process uint8 batches -> one global `jax.Array` per key, with checkpointable state.

Every process reads its own contiguous part of the split (`tfds.split_for_jax_process`), shuffles it with
seeds drawn from (config seed, process index), repeats it forever, flips images with randomness keyed by
(seed, process, position in the stream), and batches `global_batch_size / process_count` rows. The batches
become global arrays sharded over the mesh's batch axes. Images stay uint8 until the train step calls
`to_model_range`, which quarters the host-to-device bytes.

Resume: `get_state()` is this process's tf.data iterator state as bytes (shuffle buffer, file positions,
prefetched batches included). `set_state(bytes)` on a freshly built iterator, in this or a new process,
continues with exactly the batches the uninterrupted stream would have given. Each process saves its own
state: one file per process index (`state_filename`).

Latent datasets (`datasets.DatasetSpec.source` set; written by `cmjax.data.latents`) take the same path: their
records hold the VAE posterior (mean, std) of each image and, where encoded with flips, of its mirror image; the
flip coin picks the variant instead of mirroring, and each row becomes z = (mean + std·ε − shift)·scale with ε keyed
by (seed, process, stream position) too and the scaling the dataset records: float32 rows, already the model's
input (`to_model_range` leaves floats alone).

Config (`config.data`, defaults in `DEFAULTS`, unknown keys are errors); the global batch size and the seed
are the top-level `config.batch_size` and `config.seed`, shared with the train step:
  name            dataset: digits | color_digits32 | cifar10 | imagenet64 | imagenet256 | lsun_bedroom | lsun_cat,
                  or a latent one: digits_latents | imagenet256_latents (cmjax/data/datasets.py)
  split           TFDS split, slicing allowed ("train", "train[:90%]")
  data_dir        TFDS data dir, local or gs://; None: TFDS's default, which honours TFDS_DATA_DIR
  shuffle_buffer  examples per process in the shuffle buffer; 0 reads in file order (no file shuffling either)
  random_flip     mirror each image left-right with probability 1/2 (latents: the stored mirror variant)
  cache           keep the decoded split in host memory (small datasets only; the cache is part of the state)
  prefetch        batches tf.data prepares ahead of the train step
  ram_budget_gb   cap on the memory tf.data's autotuner may spend on buffers, per process
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from cmjax import errors, sharding
from cmjax.data import datasets, digits

STATE_MAGIC = b"cmjax-tfdata-iterator-v1\n"
LATENT_VERSION = "1.0.0"  # of the TFDS builder `latent_images` (cmjax.data.latents.LatentImages)
DEFAULTS = {
    "name": "digits",
    "split": "train",
    "data_dir": None,
    "shuffle_buffer": 10_000,
    "random_flip": True,
    "cache": False,
    "prefetch": 2,
    "ram_budget_gb": 4.0,
}


def default_config() -> ml_collections.ConfigDict:
    """`config.data` with every key at its default."""
    config = ml_collections.ConfigDict(dict(DEFAULTS, data_dir=None))
    config.data_dir = ml_collections.config_dict.placeholder(str)  # None now, a path later
    return config


def resolve_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The data config with defaults filled in; a key this module does not read is an error."""
    given = dict(data_config)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise errors.ConfigError(f"Unknown config.data key(s) {unknown}; the keys are {sorted(DEFAULTS)}.")
    return {**DEFAULTS, **given}


def to_model_range(image: jax.Array) -> jax.Array:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (the models' data range); float rows (scaled latents) are the
    model's input already and pass unchanged."""
    if jnp.issubdtype(image.dtype, jnp.floating):
        return image.astype(jnp.float32)
    return image.astype(jnp.float32) / 127.5 - 1.0


def state_filename(process_index: int, process_count: int) -> str:
    """File name under which process `process_index` stores its iterator state in a checkpoint."""
    return f"data_process_{process_index:05d}-of-{process_count:05d}.tfdata"


def process_seeds(seed: int, process_index: int) -> dict[str, int]:
    """Independent seeds for file order, shuffle and flips, distinct per process."""
    # The first three words are those of generate_state(3): adding the latent noise seed changed no pixel stream.
    files, shuffle, flip, noise = np.random.SeedSequence([seed, process_index]).generate_state(4)
    return {"files": int(files), "shuffle": int(shuffle), "flip": int(flip), "noise": int(noise)}


def tfds_data_dir(data_dir: str | None) -> str:
    """The TFDS data dir: `data_dir`, else TFDS_DATA_DIR, else TFDS's default."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR


def find_latent_dir(spec: datasets.DatasetSpec, data_dir: str | None) -> str | None:
    """The prepared directory of latent dataset `spec` (DATA_DIR/latent_images/<name>/<version>), or None."""
    path = os.path.join(tfds_data_dir(data_dir), spec.tfds_name, LATENT_VERSION)
    return path if tf.io.gfile.exists(os.path.join(path, "dataset_info.json")) else None


def latent_metadata(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a latent dataset records: its VAE ({folder, fingerprint, scaling_factor, shift_factor}), source,
    split, flips (cmjax.data.latents `plan`)."""
    data_config = resolve_config(data_config)
    spec = datasets.get_spec(data_config["name"])
    return dict(load_builder(spec, data_config["data_dir"]).info.metadata)


def load_builder(spec: datasets.DatasetSpec, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `spec`; builds the embedded digits datasets on first use."""
    if spec.tfds_name in digits.BUILDERS:
        return digits.prepare(data_dir, spec.tfds_name)
    if spec.is_latent:  # written by --mode=encode; read back from its directory (features and metadata in it)
        path = find_latent_dir(spec, data_dir)
        if path is None:
            raise datasets.DatasetNotPreparedError(datasets.not_prepared_message(spec, tfds_data_dir(data_dir)))
        return tfds.builder_from_directory(path)
    return tfds.builder(spec.tfds_name, data_dir=data_dir)


def read_split(
    builder: tfds.core.DatasetBuilder,
    spec: datasets.DatasetSpec,
    split: str,
    *,
    process_index: int,
    process_count: int,
    file_seed: int,
    shuffle_files: bool,
) -> tf.data.Dataset:
    """This process's part of `split`, images still encoded; a missing dataset raises DatasetNotPreparedError."""
    process_split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
    read_config = tfds.ReadConfig(
        shuffle_seed=file_seed,
        # TFDS would silently cache small datasets in memory; caching is `config.data.cache`'s decision.
        try_autocache=False,
        interleave_cycle_length=16,
    )
    try:
        return builder.as_dataset(
            split=process_split,
            shuffle_files=shuffle_files,
            read_config=read_config,
            decoders=None if spec.is_latent else {"image": tfds.decode.SkipDecoding()},
        )
    except AssertionError as error:  # TFDS's way of saying the files are not there
        if "could not find data" not in str(error):
            raise
        raise datasets.DatasetNotPreparedError(
            datasets.not_prepared_message(spec, str(builder.data_dir_root))
        ) from None


def process_dataset(
    data_config: Mapping[str, Any],
    *,
    per_process_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """The infinite, deterministic stream of this process's batches `{"image": uint8 BHWC, "label": int32 B}`."""
    data_config = resolve_config(data_config)
    spec = datasets.get_spec(data_config["name"])
    builder = load_builder(spec, data_config["data_dir"])
    seeds = process_seeds(seed, process_index)
    shuffle_buffer = int(data_config["shuffle_buffer"])
    ds = read_split(
        builder,
        spec,
        data_config["split"],
        process_index=process_index,
        process_count=process_count,
        file_seed=seeds["files"],
        shuffle_files=shuffle_buffer > 0,
    )
    if spec.is_latent:
        return _latent_stream(ds, builder, spec, data_config, seeds, per_process_batch_size)
    image_feature = builder.info.features["image"]
    preprocess = datasets.preprocess_fn(spec)
    num_classes = spec.num_classes

    def decode(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = preprocess(image_feature.decode_example(example["image"]))
        label = tf.cast(example["label"], tf.int32) if num_classes else tf.constant(0, tf.int32)
        return {"image": image, "label": label}

    def keep_encoded(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        label = example["label"] if num_classes else tf.constant(0, tf.int64)
        return {"image": example["image"], "label": label}

    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    decode_late = spec.shuffle_encoded and not data_config["cache"]
    ds = ds.map(keep_encoded if decode_late else decode, **parallel)
    if data_config["cache"]:
        ds = ds.cache()
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer, seed=seeds["shuffle"], reshuffle_each_iteration=True)
    ds = ds.repeat()
    if decode_late:
        ds = ds.map(decode, **parallel)

    flip_seed = tf.constant(seeds["flip"], tf.int64)
    random_flip = bool(data_config["random_flip"])

    def flip(position: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # Keyed by stream position, not by a stateful generator: the same batches after a resume.
        coin = tf.random.stateless_uniform([], seed=tf.stack([flip_seed, position]))
        image = tf.cond(coin < 0.5, lambda: tf.reverse(example["image"], axis=[1]), lambda: example["image"])
        return {"image": image, "label": example["label"]}

    if random_flip:
        ds = ds.enumerate().map(flip, **parallel)
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(data_config["prefetch"]))
    return ds.with_options(pipeline_options(data_config, pure_python_step=spec.center_crop))


def _latent_stream(ds, builder, spec, data_config, seeds, per_process_batch_size) -> tf.data.Dataset:
    """The latent dataset's rows as the model's input: flip variant by the pixel pipeline's coin, then
    z = (mean + std·ε − shift)·scale (see the module docstring)."""
    metadata = builder.info.metadata
    variants = builder.info.features["mean"].shape[0]
    random_flip = bool(data_config["random_flip"])
    if random_flip and variants < 2:
        raise errors.ConfigError(
            f"config.data.random_flip=True, but dataset {spec.name!r} was encoded without flips (no mirror-image "
            "latents): set config.data.random_flip=False, or encode it again with random_flip=True (--mode=encode).")
    scale = float(metadata["vae"]["scaling_factor"])
    shift = float(metadata["vae"]["shift_factor"] or 0.0)
    conditional = bool(spec.num_classes)
    ds = ds.map(lambda ex: {"mean": ex["mean"], "std": ex["std"],
                            "label": ex["label"] if conditional else tf.constant(0, tf.int64)},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if data_config["cache"]:
        ds = ds.cache()
    if int(data_config["shuffle_buffer"]) > 0:
        ds = ds.shuffle(int(data_config["shuffle_buffer"]), seed=seeds["shuffle"], reshuffle_each_iteration=True)
    ds = ds.repeat()
    flip_seed, noise_seed = tf.constant(seeds["flip"], tf.int64), tf.constant(seeds["noise"], tf.int64)

    def sample(position: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # The same coin as a pixel image's flip at this position; ε keyed by position as well.
        coin = tf.random.stateless_uniform([], seed=tf.stack([flip_seed, position]))
        variant = tf.cast(random_flip, tf.int32) * tf.cast(coin < 0.5, tf.int32)
        mean, std = example["mean"][variant], example["std"][variant]
        noise = tf.random.stateless_normal(tf.shape(mean), seed=tf.stack([noise_seed, position]))
        return {"image": (mean + std * noise - shift) * scale, "label": tf.cast(example["label"], tf.int32)}

    ds = ds.enumerate().map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(data_config["prefetch"]))
    return ds.with_options(pipeline_options(data_config))


def pipeline_options(data_config: Mapping[str, Any], *, pure_python_step: bool = False) -> tf.data.Options:
    """Deterministic order, bounded host memory, and no TF threads racing JAX for every core."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.ram_budget = int(float(data_config["ram_budget_gb"]) * 2**30)
    # tf.data already runs elements in parallel; threads inside each op would only compete with them.
    options.threading.max_intra_op_parallelism = 1
    # tf.data counts every Python function as stateful and refuses to checkpoint it. Our only one (the PIL
    # center crop) is a pure function of its input, so its "state" may be ignored; other pipelines keep FAIL.
    policy = tf.data.experimental.ExternalStatePolicy
    options.experimental_external_state_policy = policy.IGNORE if pure_python_step else policy.FAIL
    return options


def serialize_iterator(iterator: tf.data.Iterator, dataset: tf.data.Dataset) -> bytes:
    """A tf.data iterator's full state as one byte string."""
    policy = dataset.options().experimental_external_state_policy or tf.data.experimental.ExternalStatePolicy.FAIL
    variant = tf.raw_ops.SerializeIterator(
        resource_handle=iterator._iterator_resource,  # pylint: disable=protected-access
        external_state_policy=policy.value,
    )
    parts = [tf.io.serialize_tensor(part) for part in tf.unstack(variant)]
    return tf.io.serialize_tensor(tf.stack(parts)).numpy()


def deserialize_iterator(iterator: tf.data.Iterator, state: bytes) -> None:
    """Puts a state from `serialize_iterator` into an iterator over the same dataset."""
    parts = tf.unstack(tf.io.parse_tensor(state, tf.string))
    variant = tf.stack([tf.io.parse_tensor(part, tf.variant) for part in parts])
    tf.raw_ops.DeserializeIterator(
        resource_handle=iterator._iterator_resource,  # pylint: disable=protected-access
        serialized=variant,
    )


class GlobalBatchIterator:
    """Infinite iterator of global batches; `get_state`/`set_state` make it resumable per process."""

    def __init__(
        self, dataset: tf.data.Dataset, mesh: Mesh, description: Mapping[str, Any], spec: datasets.DatasetSpec
    ):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self._mesh = mesh
        self._description = dict(description)
        self.image_shape: tuple[int, int, int] = spec.image_shape
        self.dtype = jnp.dtype(spec.dtype)  # uint8 pixels, or float32 latents
        self.num_classes: int = spec.num_classes
        self.global_batch_size: int = description["global_batch_size"]
        self.per_process_batch_size: int = description["per_process_batch_size"]

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of a global batch, to compile the train step before any data arrives."""
        rows, batch_sharding = self.global_batch_size, sharding.batch_sharding(self._mesh)
        return {
            "image": jax.ShapeDtypeStruct((rows, *self.image_shape), self.dtype, sharding=batch_sharding),
            "label": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch_sharding),
        }

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next batch, as numpy (no device transfer)."""
        return jax.tree.map(np.asarray, next(self._iterator))

    def __next__(self) -> dict[str, jax.Array]:
        return sharding.host_local_to_global(self.next_local(), self._mesh)

    def get_state(self) -> bytes:
        """This process's position: a header naming the stream, then the tf.data iterator state."""
        header = json.dumps(self._description, sort_keys=True).encode() + b"\n"
        return STATE_MAGIC + header + serialize_iterator(self._iterator, self._dataset)

    def set_state(self, state: bytes) -> None:
        """Continues from a `get_state()` of the same stream (same data config, seed, batch, process)."""
        if not state.startswith(STATE_MAGIC):
            # Damage, not a config error: the checkpoint reader reports it as an unreadable file.
            raise ValueError("Not a cmjax data iterator state (bad header).")
        header, payload = state[len(STATE_MAGIC) :].split(b"\n", 1)
        saved = json.loads(header)
        if saved != self._description:
            differ = {k: (saved.get(k), self._description.get(k)) for k in saved.keys() | self._description.keys()
                      if saved.get(k) != self._description.get(k)}
            raise errors.ConfigError(
                f"Data iterator state was saved for a different stream; (saved, now) differ in {differ}. "
                "Restore with the same data config, seed, batch size and process count, or start the data "
                "stream afresh."
            )
        deserialize_iterator(self._iterator, payload)


def build(
    data_config: Mapping[str, Any],
    mesh: Mesh,
    *,
    global_batch_size: int,
    seed: int,
) -> GlobalBatchIterator:
    """The training input: global batches `{"image": uint8 [B,H,W,C] (float32 for latent datasets), "label": int32
    [B]}` sharded over `mesh`."""
    data_config = resolve_config(data_config)
    process_index, process_count = jax.process_index(), jax.process_count()
    per_process_batch_size = sharding.process_batch_size(global_batch_size, mesh)  # raises on an uneven split
    spec = datasets.get_spec(data_config["name"])
    dataset = process_dataset(
        data_config,
        per_process_batch_size=per_process_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    description = {
        # Where the files live and the memory budget may change between runs; the stream does not.
        "data": {k: v for k, v in sorted(data_config.items()) if k not in ("data_dir", "ram_budget_gb")},
        "seed": seed,
        "global_batch_size": global_batch_size,
        "per_process_batch_size": per_process_batch_size,
        "process_index": process_index,
        "process_count": process_count,
    }
    return GlobalBatchIterator(dataset, mesh, description, spec)


def save_state(iterator: GlobalBatchIterator, directory: str) -> str:
    """Writes this process's iterator state to `directory` (local or gs://), one file per process."""
    path = os.path.join(directory, state_filename(jax.process_index(), jax.process_count()))
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(iterator.get_state())
    return path


def restore_state(iterator: GlobalBatchIterator, directory: str) -> None:
    """Reads this process's file written by `save_state` into `iterator`."""
    path = os.path.join(directory, state_filename(jax.process_index(), jax.process_count()))
    if not tf.io.gfile.exists(path):
        found = sorted(tf.io.gfile.glob(os.path.join(directory, "data_process_*")))
        raise errors.MissingFileError(
            f"No data iterator state {path!r} for process {jax.process_index()} of {jax.process_count()}; "
            f"the directory holds {[os.path.basename(f) for f in found]}. States are per process: resume "
            "with the process count that saved them, or start the data stream afresh."
        )
    with tf.io.gfile.GFile(path, "rb") as handle:
        iterator.set_state(handle.read())


def eval_images(
    data_config: Mapping[str, Any],
    split: str,
    per_process_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `split` for evaluation (reference statistics): this process's share, once, in file order.
    For a latent dataset, the pixel images it encodes (the FID reference of samples decoded to pixels).

    Yields `{"image": uint8 [b, H, W, C], "mask": bool [b]}` with b = `per_process_batch_size`; the last batches
    are padded (mask False). Every process yields the same number of batches (shares differ by at most one
    example), so the batches can be stitched into global arrays in lockstep. No shuffling, flips or repeats.
    """
    data_config = resolve_config(data_config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    spec = datasets.get_spec(datasets.pixel_source(data_config["name"]))  # a latent dataset's: its source pixels
    builder = load_builder(spec, data_config["data_dir"])
    total = builder.info.splits[split].num_examples
    num_batches = -(-(-(-total // process_count)) // per_process_batch_size)
    ds = read_split(builder, spec, split, process_index=process_index, process_count=process_count, file_seed=0,
                    shuffle_files=False)
    image_feature = builder.info.features["image"]
    preprocess = datasets.preprocess_fn(spec)
    ds = ds.map(lambda example: preprocess(image_feature.decode_example(example["image"])),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process_batch_size).prefetch(int(data_config["prefetch"]))
    ds = ds.with_options(pipeline_options(data_config, pure_python_step=spec.center_crop))
    batches = iter(tfds.as_numpy(ds))
    empty = np.zeros((per_process_batch_size, *spec.image_shape), np.uint8)
    for _ in range(num_batches):
        images = next(batches, empty[:0])
        mask = np.arange(per_process_batch_size) < len(images)
        yield {"image": np.concatenate([images, empty[len(images):]]), "mask": mask}
