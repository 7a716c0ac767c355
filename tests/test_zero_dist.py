"""ZeRO (`sl.optim.zero`) on 4 real gloo ranks: the simulated run's numbers, for real.

Each stage (1 and 3 by default, 0 and 2 in the slow tier) trains the dp=4 GPT of tests/test_zero.py (uneven sizes, float64,
3 AdamW steps) on `Mesh.distributed({"dp": 4})`. Each rank's final parameters
equal torch.optim.AdamW on the unsharded model (1e-10), and each rank's ledger
of the last step equals the simulated mesh's record for record (kind, axes,
bytes, cause): the bytes formulas checked there hold on real processes.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_zero import reference_training, run_training, train


def run_on_rank(mesh, stages):
    out = {}
    for stage in stages:
        full, losses, records, _, _ = run_training(mesh, "dp4", stage)
        out[stage] = (full, losses, [(r.kind, r.axes, r.bytes, r.cause) for r in records])
    return out


@pytest.mark.dist
@pytest.mark.parametrize(
    "stages", [(1, 3), pytest.param((0, 2), marks=pytest.mark.slow)], ids=["1+3", "0+2"]
)
def test_stages_on_4_gloo_ranks_equal_unsharded_and_simulated(workers4, stages):
    results = workers4.run(run_on_rank, {"dp": 4}, (stages,))
    ref, ref_losses = reference_training("dp4")
    for rank, per_stage in enumerate(results):
        for stage in stages:
            full, losses, records = per_stage[stage]
            for k in ref:
                torch.testing.assert_close(
                    full[k], ref[k], rtol=1e-10, atol=1e-12, msg=f"rank {rank} stage {stage} {k}"
                )
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0
            )
            _, _, sim, _, _ = train("dp4", stage)
            assert records == [(r.kind, r.axes, r.bytes, r.cause) for r in sim], (rank, stage)
