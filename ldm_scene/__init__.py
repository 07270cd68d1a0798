"""ldm-scene: see inside a latent diffusion model while it paints.

Linear probes on a UNet's self-attention outputs read the scene's foreground, depth and shading at
every denoising step (after Chen, Viégas & Wattenberg 2023, "Beyond Surface Statistics").
"""

__version__ = "0.1.0"
