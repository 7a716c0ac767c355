"""Rules for batch, group, instance and local-response normalization (forward and backward).

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
