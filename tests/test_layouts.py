"""Layouts, meshes and shard arithmetic as pure data (tier 1, no process group).

Covers:
- `sl.P` / `sl.Layout`: construction, equality of equal placements, one
  printed notation (`str` == `repr` == the `P(...)` call, pasting back through
  `eval` for sampled layouts, also inside error messages), hashing, the partial
  forms (name, tuple, dict with sum/avg/max/min) and every error a user can
  cause, each checked for type
  (`sl.LayoutError`, a `ValueError`) and for a message that names the
  offending values and a fix;
- `sl.Mesh` / `sl.AbstractMesh`: names, shape, size, row-major flat indices
  (`coords`, `flat_index`, `index_along`, `group`) against itertools
  references, equality, and the errors of `sl.Mesh.simulated`;
- shard arithmetic: `chunk_bounds` against its definition and against
  `torch.chunk` (which may return fewer than k chunks), and flat chunk indices
  of dims split over several axes (``i_a * |b| + i_b``);
- the README's ``# prints: ...`` comments: each is what its line really prints
  (doctest matching, ``...`` for elided text), and no other layout notation
  appears there.

Tolerances: none; everything here is exact integer arithmetic.
"""

from __future__ import annotations

import builtins
import doctest
import io
import itertools
import math
import os
import pathlib
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardlib as sl
from shardlib.layouts import chunk_bounds, local_bounds, local_shape, max_local_shape

P = sl.P
MESH = sl.Mesh.simulated({"a": 2, "b": 3})


def raises_layout_error(fn, *fragments: str) -> str:
    """Run `fn`, expect a LayoutError (a ValueError) whose message holds every fragment."""
    with pytest.raises(sl.LayoutError) as info:
        fn()
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# == Layout / P ================================================================
def test_construction():
    assert P().dims == ()
    assert P("x", None).dims == (("x",), ())
    assert P(("a", "b"), None, "c").dims == (("a", "b"), (), ("c",))
    assert P(["a", "b"], None) == P(("a", "b"), None)
    p = P("a", None, partial="b")
    assert (p.ndim, p.partial, p.reduce_op) == (2, ("b",), "sum")
    assert p.used_axes == {"a", "b"}
    assert p.replicated_axes(sl.AbstractMesh(("a", "b", "c"), (2, 2, 2))) == ("c",)
    assert p.dim_of("a") == 0 and p.dim_of("b") is None
    assert P(None, None).is_replicated and not p.is_replicated
    assert not P(None, partial="a").is_replicated
    assert isinstance(p, sl.Layout)
    assert sl.Layout((("a",), ()), ("b",)) == p


@pytest.mark.parametrize(
    "left, right",
    [
        (P("x", None), P(("x",), None)),
        (P("x", None), P(["x"], None)),
        (P(None, partial="a"), P(None, partial=("a",))),
        (P(None, partial="a"), P(None, partial={"a": "sum"})),
        (P(None, partial=("a", "b")), P(None, partial=("b", "a"))),
        (P(None, partial={"a": "max", "b": "max"}), P(None, partial={"b": "max", "a": "max"})),
        (P(None, partial=()), P(None)),
        (P(None, partial={}), P(None)),
        (sl.Layout(((),), (), "max"), P(None)),  # reduce op is "sum" when nothing is partial
    ],
)
def test_equal_placements_compare_equal(left, right):
    assert left == right
    assert hash(left) == hash(right)


@pytest.mark.parametrize(
    "left, right",
    [
        (P("x", None), P(None, "x")),
        (P(("a", "b"), None), P(("b", "a"), None)),
        (P("a", None), P("a")),
        (P(None, partial="a"), P(None)),
        (P(None, partial="a"), P(None, partial={"a": "max"})),
        (P(None, partial={"a": "avg"}), P(None, partial={"a": "min"})),
    ],
)
def test_different_placements_differ(left, right):
    assert left != right
    assert not left == right  # noqa: SIM201 (__eq__ itself, not only __ne__)


def test_a_layout_never_equals_another_type():
    assert P("x", None) != (("x",), ())
    assert P() != None  # noqa: E711
    assert P("x") != "P('x')"


LAYOUTS = [
    P(),
    P(None),
    P("dp", None),
    P(None, "tp"),
    P(("dp", "tp"), None, "sp"),
    P(None, None, partial="tp"),
    P("dp", partial=("sp", "tp")),
    P(None, partial={"tp": "max"}),
    P(("a", "b"), partial={"c": "avg", "d": "avg"}),
    P(partial={"x": "min"}),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_repr_pastes_back(layout):
    assert eval(repr(layout), {"P": P}) == layout


def test_repr_and_str_forms():
    assert repr(P("dp", None)) == "P('dp', None)"
    assert repr(P(("dp", "tp"), None)) == "P(('dp', 'tp'), None)"
    assert repr(P(None, partial="tp")) == "P(None, partial='tp')"
    assert repr(P(None, partial=("tp", "dp"))) == "P(None, partial=('dp', 'tp'))"
    assert repr(P(None, partial={"tp": "max"})) == "P(None, partial={'tp': 'max'})"
    assert repr(P()) == "P()"


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_str_is_repr(layout):
    assert str(layout) == repr(layout) == f"{layout}" == f"{layout!r}"


CASES = int(os.environ.get("SHARDLIB_HYPOTHESIS_CASES", 100))
_AXES = ("dp", "tp", "a", "b", "x")


@st.composite
def layouts(draw) -> sl.Layout:
    """Any valid layout over the axes in `_AXES`: each axis on one dim, partial, or unused."""
    ndim = draw(st.integers(0, 4))
    where = draw(st.permutations(_AXES))
    dims: list[list[str]] = [[] for _ in range(ndim)]
    partial = []
    for axis in where:
        slot = draw(st.integers(-2, ndim - 1))  # -2: unused, -1: partial
        if slot >= 0:
            dims[slot].append(axis)
        elif slot == -1:
            partial.append(axis)
    op = draw(st.sampled_from(sl.layouts.REDUCE_OPS))
    spec = [
        None if not d else d[0] if len(d) == 1 and draw(st.booleans()) else tuple(d) for d in dims
    ]
    return P(*spec, partial={a: op for a in partial} or None)


@settings(derandomize=True, deadline=None, max_examples=CASES, database=None)
@given(layouts())
def test_printed_layout_pastes_back(layout):
    for text in (str(layout), repr(layout), f"{layout}"):
        assert eval(text, {"P": P}) == layout, text
    assert eval(str(layout), {"P": P}).reduce_op == layout.reduce_op


def test_error_messages_print_layouts_as_p_calls():
    msg = raises_layout_error(lambda: P("x", None).check(MESH, 2, "f(layout=...)"), "P('x', None)")
    assert "S(" not in msg and "[R" not in msg


def test_layouts_are_hashable_cache_keys():
    assert len({P("x", None), P(("x",), None), P(["x"], None)}) == 1
    assert len(set(LAYOUTS)) == len(LAYOUTS)
    cache = {P("x", None): 1}
    assert cache[P(("x",), None)] == 1
    with pytest.raises(AttributeError):
        P("x").dims = ()  # frozen


@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
def test_partial_dict_forms(op):
    p = P(None, partial={"a": op, "b": op})
    assert p.partial == ("a", "b") and p.reduce_op == op
    assert P(None, partial={"a": op}).reduce_op == op


def test_partial_sequence_forms_are_sum():
    for partial in ["a", ("a",), ["a"], {"a"}, frozenset({"a"})]:
        p = P(None, partial=partial)
        assert (p.partial, p.reduce_op) == (("a",), "sum")


def test_derived_layouts():
    p = P("a", None, partial={"c": "max"})
    assert p.without_partial() == P("a", None)
    assert p.with_dim(1, ("b",)) == P("a", "b", partial={"c": "max"})
    assert p.with_partial(("c", "d")) == P("a", None, partial={"c": "max", "d": "max"})


# -- errors --------------------------------------------------------------------
def test_unknown_axis_names_axis_mesh_and_layout():
    msg = raises_layout_error(
        lambda: P("z", None).check(MESH.abstract, 2),
        "P('z', None)",
        "unknown mesh axis 'z'",
        "{'a': 2, 'b': 3}",  # the axes to pick from instead
    )
    assert "layout" in msg
    raises_layout_error(
        lambda: P(None, partial="q").check(MESH.abstract, 1, "sl.shard(layout=...)"),
        "sl.shard(layout=...)",
        "'q'",
    )


def test_check_reports_every_problem_at_once():
    raises_layout_error(
        lambda: P("z", None, "a").check(MESH.abstract, 2),
        "unknown mesh axis 'z'",
        "3 entries for a 2-d tensor",
    )


def test_axis_used_twice():
    raises_layout_error(
        lambda: P("x", "x"),
        "'x' (dim 0 and dim 1)",
        "at most once",
        'P(("dp", "tp"), None)',  # the fix: split one dim over several axes
    )
    raises_layout_error(lambda: P(("a", "a")), "'a' (dim 0 and dim 0)")
    raises_layout_error(lambda: P("x", None, partial="x"), "'x' (dim 0 and partial)")
    raises_layout_error(lambda: sl.Layout(((), ()), ("a", "a")), "'a' (partial and partial)")


def test_spec_longer_than_rank():
    raises_layout_error(
        lambda: P("a", None, None).check(MESH.abstract, 2, "sl.shard(layout=...)"),
        "sl.shard(layout=...)",
        "P('a', None, None)",
        "3 entries for a 2-d tensor",
        "one entry per tensor dim",
    )
    raises_layout_error(
        lambda: P(None, None, None).check(MESH.abstract, 2),
        "did you mean P(None, None)?",
    )
    raises_layout_error(lambda: P(None).check(MESH.abstract, 0), "a 0-d tensor takes P()")
    assert P("a", "b").check(MESH.abstract, 2) == P("a", "b")
    # Shorter specs leave trailing dims unsplit (JAX): P() is replicated at any rank.
    assert P("a").check(MESH.abstract, 2) == P("a", None)
    assert P().check(MESH.abstract, 3) == P(None, None, None)
    assert P(partial="b").check(MESH.abstract, 2) == P(None, None, partial="b")
    assert P(partial="a").check(MESH.abstract, 0) == P(partial="a")


def test_mixed_reduce_ops():
    raises_layout_error(
        lambda: P(None, partial={"a": "sum", "b": "max"}),
        "{'a': 'sum', 'b': 'max'}",
        "share one reduce op",
        "sl.reshard",  # the fix: reduce one of them first
    )


def test_unknown_reduce_op():
    raises_layout_error(
        lambda: P(None, partial={"a": "prod"}),
        "partial={'a': 'prod'}",
        "prod",
        "sum, avg, max, min",
    )
    raises_layout_error(lambda: sl.Layout(((),), ("a",), "mean"), "'mean'", "sum, avg, max, min")


def test_bad_entries_and_partial_types():
    raises_layout_error(lambda: P(None, 3), "entry 1 is 3", 'P("dp", None)')
    raises_layout_error(lambda: P(("a", 1)), "entry 0", "tuple of axis names")
    raises_layout_error(lambda: P(None, partial=3), "partial=3", '{"tp": "max"}')


# == Mesh ======================================================================
MESHES = [{"x": 8}, {"a": 2, "b": 3}, {"a": 2, "b": 3, "c": 4}, {"p": 3, "q": 1, "r": 2}]


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_mesh_shape_and_row_major_indices(axes):
    mesh = sl.Mesh.simulated(axes)
    names, shape = tuple(axes), tuple(axes.values())
    assert (mesh.axis_names, mesh.shape, mesh.size) == (names, shape, math.prod(shape))
    assert mesh.axes == axes
    assert mesh.abstract == sl.AbstractMesh(names, shape)
    every = list(itertools.product(*(range(s) for s in shape)))  # row-major reference
    assert len(every) == mesh.size
    for flat, coords in enumerate(every):
        assert mesh.coords(flat) == coords
        assert mesh.flat_index(coords) == flat
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        assert flat == sum(c * s for c, s in zip(coords, strides))


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_index_along_and_group(axes):
    mesh = sl.Mesh.simulated(axes)
    names = tuple(axes)
    subsets = [perm for r in range(len(names) + 1) for perm in itertools.permutations(names, r)]
    for dev in range(mesh.size):
        here = dict(zip(names, mesh.coords(dev)))
        for sub in subsets:
            # Row-major index of `dev` within the sub-mesh of `sub`, in that order.
            sub_coords = list(itertools.product(*(range(axes[a]) for a in sub)))
            idx = sub_coords.index(tuple(here[a] for a in sub))
            assert mesh.index_along(dev, sub) == idx
            members = [
                m
                for m in range(mesh.size)
                if all(c == here[a] for a, c in zip(names, mesh.coords(m)) if a not in sub)
            ]
            expected = tuple(sorted(members, key=lambda m: mesh.index_along(m, sub)))
            assert mesh.group(dev, sub) == expected
            assert len(expected) == mesh.group_size(sub)
            assert expected[idx] == dev


def test_design_flat_index_example():
    mesh = sl.Mesh.simulated({"dp": 2, "tp": 4})
    assert mesh.flat_index((1, 2)) == 1 * 4 + 2
    assert mesh.index_along(6, ("tp", "dp")) == 2 * 2 + 1
    assert mesh.group(6, ("tp",)) == (4, 5, 6, 7)
    assert mesh.group(6, ("dp",)) == (2, 6)


def test_mesh_equality():
    m = sl.Mesh.simulated({"a": 2, "b": 2})
    same = sl.Mesh.simulated({"a": 2, "b": 2})
    assert m == same and hash(m) == hash(same)
    assert m != sl.Mesh.simulated({"b": 2, "a": 2})  # axis order matters
    assert m != sl.Mesh.simulated({"a": 2, "c": 2})
    assert m != sl.Mesh.simulated({"a": 2, "b": 3})
    assert m != sl.Mesh.simulated({"a": 4})
    assert m != sl.Mesh(m.abstract, backend=object())  # same axes, another backend
    assert m != m.abstract
    assert repr(m) == "Mesh.simulated({'a': 2, 'b': 2})"
    assert repr(m.abstract) == "AbstractMesh({'a': 2, 'b': 2})"
    assert len({m, same}) == 1


def test_mesh_unknown_axis_error():
    raises_layout_error(lambda: MESH.axis_size("z"), "'z'", "('a', 'b')")


@pytest.mark.parametrize(
    "axes, fragments",
    [
        ({}, ["Mesh.simulated", "at least one axis", '{"x": 1}']),
        ({"x": 0}, ["Mesh.simulated", "'x' has size 0", "positive ints"]),
        ({"x": -2}, ["'x' has size -2"]),
        ({"x": 2.0}, ["'x' has size 2.0"]),
        ({"x": True}, ["'x' has size True"]),
        ({1: 2}, ["axis name 1 is not a non-empty string"]),
        ({"": 2}, ["axis name '' is not a non-empty string"]),
        ({"x": 0, 3: 2}, ["'x' has size 0", "axis name 3"]),  # every problem at once
        ([("x", 2)], ["dict of axis name -> size", '{"dp": 2, "tp": 4}']),
    ],
    ids=str,
)
def test_bad_mesh_dicts(axes, fragments):
    raises_layout_error(lambda: sl.Mesh.simulated(axes), *fragments)


def test_abstract_mesh_rejects_duplicate_names():
    raises_layout_error(lambda: sl.AbstractMesh(("a", "a"), (2, 2)), "unique", "('a', 'a')")


# == Shard arithmetic ==========================================================
def reference_bounds(n: int, k: int, c: int) -> tuple[int, int]:
    s = math.ceil(n / k)
    return min(n, c * s), min(n, (c + 1) * s)


def test_chunk_bounds_match_definition_and_torch_chunk():
    for n in range(0, 41):
        for k in range(1, 10):
            torch_chunks = torch.arange(n).chunk(k)
            assert len(torch_chunks) <= k
            bounds = [chunk_bounds(n, k, c) for c in range(k)]
            assert bounds == [reference_bounds(n, k, c) for c in range(k)]
            for c, (lo, hi) in enumerate(bounds):
                if c < len(torch_chunks):
                    assert torch_chunks[c].tolist() == list(range(lo, hi)), (n, k, c)
                else:
                    assert lo == hi == n, (n, k, c)  # chunks torch does not return are empty
            # The chunks tile [0, n) in order; chunk 0 is a largest one.
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[c][1] == bounds[c + 1][0] for c in range(k - 1))
            assert max(hi - lo for lo, hi in bounds) == bounds[0][1] - bounds[0][0]


def test_torch_chunk_can_return_fewer_chunks():
    assert len(torch.arange(6).chunk(4)) == 3
    assert [chunk_bounds(6, 4, c) for c in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 6)]
    assert [chunk_bounds(10, 4, c) for c in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [chunk_bounds(10, 2, c) for c in range(2)] == [(0, 5), (5, 10)]


@pytest.mark.parametrize("spec", [("a", "b"), ("b", "a")])
def test_multi_axis_flat_chunk_index(spec):
    mesh = sl.Mesh.simulated({"a": 2, "b": 3})
    shape = (13, 4)
    layout = P(spec, None)
    x = torch.arange(math.prod(shape)).reshape(shape)
    sizes = mesh.axes
    for dev in range(mesh.size):
        here = dict(zip(mesh.axis_names, mesh.coords(dev)))
        c = here[spec[0]] * sizes[spec[1]] + here[spec[1]]  # i_major * |minor| + i_minor
        lo, hi = reference_bounds(13, 6, c)
        assert local_bounds(shape, layout, mesh.abstract, dev) == ((lo, hi), (0, 4))
        assert local_shape(shape, layout, mesh.abstract, dev) == (hi - lo, 4)
        (dlo, dhi), _ = local_bounds(shape, layout, mesh.abstract, dev)
        assert torch.equal(x[dlo:dhi], x[lo:hi])
    assert max_local_shape(shape, layout, mesh.abstract) == (3, 4)


def test_two_dims_split_over_two_axes():
    mesh = sl.Mesh.simulated({"a": 2, "b": 3})
    shape = (5, 7)
    x = torch.arange(35).reshape(shape)
    for dev in range(mesh.size):
        i_a, i_b = mesh.coords(dev)
        (r0, r1), (c0, c1) = local_bounds(shape, P("a", "b"), mesh.abstract, dev)
        assert torch.equal(x[r0:r1, c0:c1], x.chunk(2, 0)[i_a].chunk(3, 1)[i_b])
    assert max_local_shape(shape, P("a", "b"), mesh.abstract) == (3, 3)
    assert max_local_shape(shape, P(None, ("a", "b")), mesh.abstract) == (5, 2)


def test_uneven_two_axis_split_is_not_nested_halves():
    """DESIGN §1: n=10 on 2x2 gives [0,3) [3,6) [6,9) [9,10), not halves of halves."""
    mesh = sl.Mesh.simulated({"a": 2, "b": 2})
    flat = [local_bounds((10,), P(("a", "b")), mesh.abstract, d)[0] for d in range(4)]
    assert flat == [(0, 3), (3, 6), (6, 9), (9, 10)]
    halves = [local_bounds((10,), P("a"), mesh.abstract, d)[0] for d in range(4)]
    assert halves == [(0, 5), (0, 5), (5, 10), (5, 10)]
    assert not (halves[1][0] <= flat[1][0] and flat[1][1] <= halves[1][1])  # [3,6) ⊄ [0,5)


# == README: the printed output its comments claim ================================
_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_PRINTS = re.compile(r"#\s*prints:(.*)$")


def _readme_claims() -> list[tuple[int, str, dict[int, str]]]:
    """(block index, code, {line number: expected output}) for README blocks with claims.

    ``print(...)  # prints: TEXT`` claims TEXT; an empty TEXT continues on the
    comment lines right below (one output line each)."""
    blocks = re.findall(r"```python\n(.*?)```", _README.read_text(), flags=re.S)
    out = []
    for i, code in enumerate(blocks):
        lines = code.splitlines()
        claims = {}
        for n, line in enumerate(lines, 1):
            m = _PRINTS.search(line)
            if not m:
                continue
            first = m.group(1).strip()
            want = [first] if first else []
            if not first:
                for below in lines[n:]:
                    if not below.lstrip().startswith("#"):
                        break
                    want.append(below.lstrip()[1:])
            claims[n] = "\n".join(want)
        if claims:
            out.append((i, code, claims))
    return out


def test_readme_has_print_claims():
    claims = [c for _, _, cs in _readme_claims() for c in cs.values()]
    assert len(claims) >= 5 and all(claims)


@pytest.mark.parametrize("index, code, claims", _readme_claims(), ids=lambda v: str(v)[:12])
def test_readme_comments_show_what_prints(index, code, claims):
    name = f"README.md block {index}"
    printed: dict[int, list[str]] = {}

    def recording_print(*args, sep=" ", end="\n", file=None, flush=False):
        frame = sys._getframe(1)
        if file is not None or frame.f_code.co_filename != name:
            return builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
        buf = io.StringIO()
        builtins.print(*args, sep=sep, end=end, file=buf)
        printed.setdefault(frame.f_lineno, []).append(buf.getvalue())

    exec(compile(code, name, "exec"), {"__name__": "readme_block", "print": recording_print})
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for line, want in claims.items():
        got = "".join(printed.get(line, []))
        assert got, f"{name} line {line} claims output but printed nothing"
        assert checker.check_output(want + "\n", got, flags), (
            f"{name} line {line}: the comment says\n{want}\nbut it printed\n{got}"
        )


def test_readme_uses_one_layout_notation():
    text = _README.read_text()
    assert not re.search(r"\bS\([a-z]|\[R[,\]]|partial\((sum|avg|max|min):", text)


def test_a_layout_pickled_in_another_process_equals_and_hashes_as_here():
    """String hashes differ between processes; a layout from a worker must still be equal
    to (and find the dict entries of) the same layout made here."""
    import pickle
    import subprocess
    import sys

    code = (
        "import pickle, sys, shardlib as sl; "
        "sys.stdout.buffer.write(pickle.dumps(sl.P(('dp', 'tp'), None, partial='sp')))"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    blob = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env
    ).stdout
    got = pickle.loads(blob)
    want = P(("dp", "tp"), None, partial="sp")
    assert got == want and hash(got) == hash(want) and {want: 1}[got] == 1
