"""The rule validator (tools/validate_rules.py) reports zero wrong and zero missing rules.

Every layout combination (each mesh axis unused, on a dim, or partial-sum) of
the inputs of ~40 ops on a simulated {a:2, b:2} mesh is compared with the
unsharded float64 result (rtol 1e-9, atol 1e-9). Partial inputs carry summands
that differ per device, so a rule that ignores partial axes shows up.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest

_path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "validate_rules.py"
_spec = importlib.util.spec_from_file_location("validate_rules", _path)
validate_rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate_rules)


@pytest.mark.parametrize("op", list(validate_rules.CASES))
def test_no_wrong_or_missing_rule(op):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own var() dof warning on tiny shards
        report, examples = validate_rules.validate({"a": 2, "b": 2}, [op])
    counts = report[op]
    assert counts["wrong"] == 0, examples[op][:3]
    assert counts["missing"] == 0
    assert counts["ok"] > 0
