"""PyTorch interop: openai `cm` state dicts (`openai.py`), diffusers `UNet2DModel` / `ConsistencyModelPipeline`
folders (`diffusers.py`), diffusers `AutoencoderKL` folders of the SD-VAE (`vae.py`), and the `--mode=export` /
`--mode=import` entry points over cmjax runs (`runs.py`).

The entry points import the training stack lazily, so `cmjax.interop.openai` and `.diffusers` stay light.
"""
from __future__ import annotations

from typing import Any


def export_checkpoint(config, workdir: str, *, step: int | None = None, ema_rate: str | float | None = None,
                      format: str = "diffusers", output: str) -> dict[str, Any]:
    """See `cmjax.interop.runs.export_checkpoint`."""
    from cmjax.interop import runs

    return runs.export_checkpoint(config, workdir, step=step, ema_rate=ema_rate, format=format, output=output)


def import_checkpoint(config, workdir: str, *, format: str = "openai", input: str) -> dict[str, Any]:
    """See `cmjax.interop.runs.import_checkpoint`."""
    from cmjax.interop import runs

    return runs.import_checkpoint(config, workdir, format=format, input=input)
