"""Device mesh from config, the batch sharding, and host-local <-> global arrays.

The mesh has two axes, ("data", "fsdp"). A batch is split over both of them (every device holds a distinct
slice of the examples); parameters are split over "fsdp" only: `param_partition_specs` picks one dimension of
each large parameter (its output features, by logical axis name) and `state_shardings` extends that to a whole
TrainState. On several hosts every process runs this same code: each feeds its own rows and `host_local_to_global`
stitches them into one `jax.Array` without moving data between hosts.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmjax import errors

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every mesh axis, in this order.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, Any], device_count: int) -> tuple[int, int]:
    """Resolves `{"data": d, "fsdp": f}` (one of them may be -1: the devices left over) to concrete sizes."""
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
    if unknown:
        raise errors.ConfigError(f"Unknown mesh axes {unknown}; the mesh axes are {list(MESH_AXES)}.")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise errors.ConfigError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise errors.ConfigError(f"Mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise errors.ConfigError(
                f"Mesh {dict(zip(MESH_AXES, sizes))}: {device_count} devices do not divide by {fixed}."
            )
        sizes[sizes.index(-1)] = device_count // fixed
    if math.prod(sizes) != device_count:
        raise errors.ConfigError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {device_count} are "
            "present; set one axis to -1 to use all of them."
        )
    return sizes[0], sizes[1]


def make_mesh(mesh_config: Mapping[str, Any], devices: Any = None) -> Mesh:
    """The ("data", "fsdp") mesh over all devices (of every process) described by `config.mesh`."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: the step is written with in/out shardings and sharding constraints, not sharding-in-types.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; other dimensions whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_device_count(mesh: Mesh) -> int:
    """How many ways a global batch is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Rows each process feeds; a batch that does not split evenly over the devices is an error."""
    devices = batch_device_count(mesh)
    if global_batch_size <= 0 or global_batch_size % devices:
        raise errors.ConfigError(
            f"Global batch size {global_batch_size} does not divide evenly over the {devices} devices of the "
            f"mesh {dict(mesh.shape)}; choose a multiple of {devices}."
        )
    # Processes own equal numbers of devices, so an even split over devices is an even split over processes.
    return global_batch_size // jax.process_count()


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
    """Stitches every process's rows (numpy, leading batch dim) into global arrays sharded over the batch."""
    sharding = batch_sharding(mesh)

    def to_global(x: np.ndarray) -> jax.Array:
        global_shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(to_global, tree)


def global_to_host_local(tree: Any) -> Any:
    """This process's rows of batch-sharded global arrays, as numpy, in global row order."""

    def to_local(x: jax.Array) -> np.ndarray:
        shards = {}
        for shard in x.addressable_shards:
            start = shard.index[0].start or 0
            shards.setdefault(start, shard.data)  # replicas of the same rows appear once
        return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)

    return jax.tree.map(to_local, tree)


# ---------------------------------------------------------------------------------------------------------------
# Parameter rules (FSDP): large parameters split over "fsdp" and gathered by XLA where used; small ones replicated.
# ---------------------------------------------------------------------------------------------------------------

FSDP_AXIS = "fsdp"
# Logical axis names (cmjax.models.layers) preferred for the split, in order: the output-feature dimension.
FSDP_PREFERRED_LOGICAL_AXES = ("conv_out", "embed_out", "vocab")
# Parameters with fewer elements than this stay replicated: gathering them would cost more than it saves.
MIN_SIZE_TO_SHARD = 2**18


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _fsdp_dim(shape: tuple[int, ...], names: Sequence[Any] | None, fsdp_size: int) -> int | None:
    """The dimension to split over "fsdp": a preferred logical axis, else the largest divisible one (ties: last)."""
    divisible = [d for d, n in enumerate(shape) if n % fsdp_size == 0]
    if not divisible:
        return None
    if names is not None:
        for logical in FSDP_PREFERRED_LOGICAL_AXES:
            if logical in names and names.index(logical) in divisible:
                return names.index(logical)
    return max(divisible, key=lambda d: (shape[d], d))


def param_partition_specs(abstract_params: Any, mesh: Mesh, *, min_size_to_shard: int = MIN_SIZE_TO_SHARD) -> Any:
    """A PartitionSpec per parameter: one dimension split over "fsdp" for large parameters, P() for the rest.

    Accepts the boxed tree of `jax.eval_shape(module.init, ...)["params"]` (nn.Partitioned leaves carry logical
    names, and the output-feature axis is preferred) or a plain tree of arrays / ShapeDtypeStructs (the largest
    dimension divisible by the fsdp size is split). Returns a plain (unboxed) tree, shaped like the parameters.
    """
    fsdp_size = mesh.shape[FSDP_AXIS]

    def spec(leaf: Any) -> P:
        names = tuple(leaf.names) if _is_box(leaf) else None
        value = leaf.value if _is_box(leaf) else leaf
        shape = tuple(value.shape)
        if fsdp_size == 1 or math.prod(shape) < min_size_to_shard:
            return P()
        dim = _fsdp_dim(shape, names, fsdp_size)
        if dim is None:
            return P()
        return P(*(FSDP_AXIS if d == dim else None for d in range(len(shape))))

    return jax.tree.map(spec, abstract_params, is_leaf=_is_box)


def _specs_like_params(tree: Any, params: Any, param_specs: Any) -> Any:
    """Specs for a tree whose subtrees may mirror `params` (optimizer moments): those get `param_specs`, others P()."""
    treedef = jax.tree.structure(params)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]

    def mirrors_params(node: Any) -> bool:
        if jax.tree.structure(node) != treedef:
            return False
        return [tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(node)] == shapes

    def spec(node: Any) -> Any:
        return param_specs if mirrors_params(node) else P()

    return jax.tree.map(spec, tree, is_leaf=mirrors_params)


def state_shardings(abstract_state: Any, mesh: Mesh, *, param_specs: Any = None,
                    min_size_to_shard: int = MIN_SIZE_TO_SHARD) -> Any:
    """NamedShardings for a whole `train_state.TrainState` (use as `out_shardings` of `jit(create)`).

    Params, every EMA copy, the target and each optimizer subtree that mirrors the params (Adam's mu and nu) are
    sharded like the params; counts and other scalars are replicated. Pass `param_specs` from
    `param_partition_specs(boxed_abstract_params, mesh)` to shard by logical names; without it the specs are
    derived from the plain `abstract_state.params` by shape.
    """
    params = abstract_state.params
    if param_specs is None:
        param_specs = param_partition_specs(params, mesh, min_size_to_shard=min_size_to_shard)
    if jax.tree.structure(param_specs, is_leaf=lambda x: isinstance(x, P)) != jax.tree.structure(params):
        raise errors.ConfigError(
            "param_specs does not match the state's parameter tree; build it with param_partition_specs from the "
            "same model's abstract init (boxed or unboxed)."
        )
    specs = abstract_state.replace(
        step=P(),
        params=param_specs,
        opt_state=_specs_like_params(abstract_state.opt_state, params, param_specs),
        ema={key: param_specs for key in abstract_state.ema},
        target_params=None if abstract_state.target_params is None else param_specs,
        nonfinite_steps=P(),
        skipped_steps=P(),
    )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def gather_to_hosts(tree) -> Any:
    """Every row of batch-sharded global arrays as numpy on every process, in global order (evaluation's metric
    inputs, the encoder's latent chunks)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))


def from_process_0(value):
    """Process 0's numpy array (or bool / int), on every process: one decision every host follows."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)
