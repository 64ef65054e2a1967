"""bench/vs_pytorch.py times the same math on both sides: with dropout 0, identical weights and identical
(x, z, pair indices, N), the PyTorch iCT loss on diffusers' UNet2DModel equals cmjax's own `ict` objective,
and so does the loss after one Adam update of each (gradients and optimizer agree too)."""
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import vs_pytorch  # noqa: E402


@pytest.mark.slow  # 1.5 minutes on 2 cores: a reduced ADM UNet step in both frameworks
def test_pytorch_ict_step_matches_cmjax_objective():
    # The digits UNet cut to one level (attention at 8×8) so that the two compiles stay short.
    eq = vs_pytorch.equivalence("digits", batch=4, overrides={"channel_mult": (1,), "attention_resolutions": (8,)})
    assert len(set(eq["index"])) > 1  # several noise levels in the batch
    # Weighted pseudo-Huber loss of order 1–100: float32 agreement to ~1e-5 relative.
    assert abs(eq["jax_loss"] - eq["torch_loss"]) <= 1e-4 * abs(eq["jax_loss"]), eq
    assert abs(eq["jax_after"] - eq["torch_after"]) <= 1e-3 * abs(eq["jax_after"]), eq
    # The update changed the loss (the second comparison is not the first one again).
    assert abs(eq["jax_after"] - eq["jax_loss"]) > 1e-3 * abs(eq["jax_loss"]), eq
