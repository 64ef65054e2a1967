"""Device mesh from config, the batch sharding, and host-local <-> global arrays.

The mesh has two axes, ("data", "fsdp"). A batch is split over both of them (every device holds a distinct
slice of the examples); parameters are split over "fsdp" only (rules added with the FSDP work). On several
hosts every process runs this same code: each feeds its own rows and `host_local_to_global` stitches them into
one `jax.Array` without moving data between hosts.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every mesh axis, in this order.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, Any], device_count: int) -> tuple[int, int]:
    """Resolves `{"data": d, "fsdp": f}` (one of them may be -1: the devices left over) to concrete sizes."""
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"Unknown mesh axes {unknown}; the mesh axes are {list(MESH_AXES)}.")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))}: {device_count} devices do not divide by {fixed}."
            )
        sizes[sizes.index(-1)] = device_count // fixed
    if math.prod(sizes) != device_count:
        raise ValueError(
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
        raise ValueError(
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
