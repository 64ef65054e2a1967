"""Mesh from config, the batch sharding, and host-local <-> global arrays on 8 CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from cmjax import sharding


@pytest.mark.parametrize(
    "config, shape",
    [({"data": -1, "fsdp": 1}, (8, 1)), ({"data": 2, "fsdp": -1}, (2, 4)), ({"fsdp": -1}, (1, 8)),
     ({"data": 4, "fsdp": 2}, (4, 2))],
)
def test_mesh_shape_fills_minus_one(config, shape):
    assert sharding.mesh_shape(config, 8) == shape


@pytest.mark.parametrize(
    "config, message",
    [({"data": -1, "fsdp": -1}, "At most one"), ({"data": 3, "fsdp": -1}, "do not divide by 3"),
     ({"data": 2, "fsdp": 2}, "has 4 devices but 8"), ({"model": 2}, "Unknown mesh axes"),
     ({"data": 0, "fsdp": -1}, "positive or -1")],
)
def test_mesh_shape_errors(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(config, 8)


def test_make_mesh_uses_every_device_with_auto_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_process_batch_size_and_the_indivisible_error():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    assert sharding.batch_device_count(mesh) == 8
    assert sharding.process_batch_size(24, mesh) == 24  # one process feeds the whole batch
    with pytest.raises(ValueError, match=r"Global batch size 12 does not divide evenly over the 8 devices"):
        sharding.process_batch_size(12, mesh)


@pytest.mark.parametrize("config", [{"data": -1, "fsdp": 1}, {"data": 2, "fsdp": 4}])
def test_host_local_to_global_splits_rows_over_both_axes(config):
    mesh = sharding.make_mesh(config)
    local = {"x": np.arange(16 * 3).reshape(16, 3), "y": np.arange(16, dtype=np.int32)}
    batch = sharding.host_local_to_global(local, mesh)
    assert batch["x"].shape == (16, 3) and batch["x"].sharding.spec == P(("data", "fsdp"))
    # Device (i, j) of the mesh holds rows 2*(i*fsdp + j) .. +2: data-major, then fsdp.
    fsdp = mesh.shape["fsdp"]
    for (i, j), device in np.ndenumerate(mesh.devices):
        block = 2 * (i * fsdp + j)
        shard = next(s for s in batch["x"].addressable_shards if s.device == device)
        np.testing.assert_array_equal(shard.data, local["x"][block : block + 2])
    back = sharding.global_to_host_local(batch)
    np.testing.assert_array_equal(back["x"], local["x"])
    np.testing.assert_array_equal(back["y"], local["y"])
