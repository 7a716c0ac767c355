"""Rules for scans, sorts and selection along a dim (cumsum, cumprod, cummax/cummin, logcumsumexp, sort, argsort, topk, kthvalue, median, mode, searchsorted, ...).

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
