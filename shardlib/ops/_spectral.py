"""Rules for fft ops (torch.fft.*: _fft_r2c, _fft_c2r, _fft_c2c) along unsplit dims.

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
