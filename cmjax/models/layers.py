"""Shared Flax building blocks and the logical axis names that `cmjax.sharding` maps onto the mesh.

Parameters carry logical axis names (`nn.with_logical_partitioning`), never mesh axes, so a network
is written once and sharded by rules: large kernels are FSDP-sharded along their output features,
small parameters stay replicated.
"""
# Logical axis names used by every network's parameters.
CONV_KERNEL_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")  # HWIO
DENSE_KERNEL_AXES = ("embed_in", "embed_out")
CONV_BIAS_AXES = ("conv_out",)
DENSE_BIAS_AXES = ("embed_out",)
NORM_AXES = ("norm",)
EMBEDDING_AXES = ("vocab", "embed_out")
