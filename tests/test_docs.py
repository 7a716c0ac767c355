"""The README's Python blocks and the library's docstring examples run and hold.

README blocks are executed in order in fresh namespaces (a block's asserts are
its checks); docstring examples run with `doctest` (outputs compared exactly;
examples marked `+SKIP` start processes and are covered by test_launch.py).
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import shardlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_block_runs(index):
    code = _readme_blocks()[index]
    namespace = {"__name__": "readme_block"}  # not __main__: launch blocks only define
    exec(compile(code, f"README.md block {index}", "exec"), namespace)


def _modules() -> list[str]:
    names = ["shardlib"]
    for info in pkgutil.walk_packages(shardlib.__path__, "shardlib."):
        names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
