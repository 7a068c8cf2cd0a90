"""t2i: text-to-image diffusion in PyTorch, unCLIP (DALL-E 2) and Stable Diffusion 3.5 on one shared core."""

__version__ = "0.1.0"
