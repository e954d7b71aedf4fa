"""furlib: the thin helper package behind the Furception notebooks.

Conventions, stated once for every module:
- Images as tensors are float NCHW. ``rgb`` tensors are sRGB-encoded; a name says its range:
  ``rgb_m11`` in [-1, 1] (what the VAE reads and writes), ``rgb_01`` in [0, 1].
- Latents are ``latent_nchw``: the VAE posterior's samples, *unscaled* (no scaling_factor).
- Images on disk and PIL images are 8-bit sRGB RGB.
- Nothing does work at import time; modules import heavy optional packages inside functions.
"""

__version__ = "0.1.0"
