"""PyTorch interop: parameter name/layout maps to openai's `cm` state dicts and diffusers' `UNet2DModel`."""
