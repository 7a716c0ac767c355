"""Rules for indexing ops: gather, scatter*, index, index_put, index_select/add/copy/fill/reduce, take, put, take_along_dim, masked_scatter, ...

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
