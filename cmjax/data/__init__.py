"""Input data: TFDS datasets -> tf.data -> global batches sharded over the mesh (see pipeline.py)."""
from cmjax.data.datasets import DatasetNotPreparedError, get_spec
from cmjax.data.pipeline import (
    GlobalBatchIterator,
    build,
    default_config,
    restore_state,
    save_state,
    state_filename,
    to_model_range,
)

__all__ = [
    "DatasetNotPreparedError",
    "GlobalBatchIterator",
    "build",
    "default_config",
    "get_spec",
    "restore_state",
    "save_state",
    "state_filename",
    "to_model_range",
]
