"""Rules for linear algebra (torch.linalg.*, cholesky, lu, qr, svd, eig, solve, inv, det) and structured matrix ops (tril, triu, diag, diag_embed, trace, cross, cdist, addr, addbmm, bilinear, vdot).

Placeholder: rules are added by issue 9 (see the family list in _dispatch.py).
"""

from __future__ import annotations
