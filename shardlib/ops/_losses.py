"""Rules for losses (mse, huber, smooth_l1, bce, bce with logits, margin losses) and activation forwards/backwards not tagged pointwise.

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
