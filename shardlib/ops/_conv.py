"""Rules for convolution, pooling, padding and resampling (convolution, max/avg/adaptive pools, constant/reflect/replicate/circular pads, upsample, im2col, pixel_shuffle, grid_sample).

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
