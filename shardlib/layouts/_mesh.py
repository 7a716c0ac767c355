"""Named device meshes.

Owns `AbstractMesh` (axis names and sizes: all that layout rules and the
planner need) and `Mesh` (an abstract mesh bound to a backend that owns the
devices). It does not own process groups or collectives: the backend object a
`Mesh` carries lives in `shardlib.collectives`, imported lazily so this module
stays free of `torch.distributed`.

Invariants: axis names are unique non-empty strings, sizes are positive ints;
device ``(i, j, ...)`` has flat index ``i * prod(shape[1:]) + ...`` (row-major,
first axis major).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from .._errors import LayoutError

__all__ = ["AbstractMesh", "Mesh"]


def _parse_axes(axes: Any, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if isinstance(axes, AbstractMesh | Mesh):
        return axes.axis_names, axes.shape
    if not isinstance(axes, Mapping):
        raise LayoutError(
            f"{where}: axes must be a dict of axis name -> size, got {axes!r}. "
            'Example: {"dp": 2, "tp": 4}.'
        )
    if not axes:
        raise LayoutError(f'{where}: a mesh needs at least one axis, e.g. {{"x": 1}}.')
    names, sizes, problems = [], [], []
    for name, size in axes.items():
        if not isinstance(name, str) or not name:
            problems.append(f"axis name {name!r} is not a non-empty string")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            problems.append(f"axis {name!r} has size {size!r}; sizes are positive ints")
        names.append(name)
        sizes.append(size)
    if problems:
        raise LayoutError(f"{where}({dict(axes)!r}): " + "; ".join(problems) + ".")
    return tuple(names), tuple(sizes)


@dataclass(frozen=True, slots=True)
class AbstractMesh:
    """Axis names and sizes of a device mesh, with no devices attached.

    Examples:
        >>> m = AbstractMesh(("dp", "tp"), (2, 4))
        >>> m.size, m.coords(5), m.flat_index((1, 1))
        (8, (1, 1), 5)
    """

    axis_names: tuple[str, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        names, shape = _parse_axes(dict(zip(self.axis_names, self.shape)), "AbstractMesh")
        if len(set(self.axis_names)) != len(self.axis_names) or len(names) != len(self.shape):
            raise LayoutError(f"AbstractMesh: axis names must be unique, got {self.axis_names!r}.")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, axis: str) -> int:
        return self.shape[self.axis_index(axis)]

    def axis_index(self, axis: str) -> int:
        try:
            return self.axis_names.index(axis)
        except ValueError:
            raise LayoutError(
                f"unknown mesh axis {axis!r}; this mesh has axes {self.axis_names!r} "
                f"(sizes {dict(zip(self.axis_names, self.shape))!r})."
            ) from None

    def group_size(self, axes: Iterable[str]) -> int:
        return math.prod(self.axis_size(a) for a in axes)

    def coords(self, flat: int) -> tuple[int, ...]:
        out = []
        for size in reversed(self.shape):
            flat, r = divmod(flat, size)
            out.append(r)
        return tuple(reversed(out))

    def flat_index(self, coords: Iterable[int]) -> int:
        flat = 0
        for c, size in zip(coords, self.shape):
            flat = flat * size + c
        return flat

    def index_along(self, flat: int, axes: Iterable[str]) -> int:
        """Flat index of device `flat` within `axes` (major -> minor, in the given order)."""
        c = self.coords(flat)
        idx = 0
        for a in axes:
            i = self.axis_index(a)
            idx = idx * self.shape[i] + c[i]
        return idx

    def group(self, flat: int, axes: tuple[str, ...]) -> tuple[int, ...]:
        """Devices that differ from `flat` only along `axes`, ordered by `index_along(axes)`."""
        return _group(self, flat, tuple(axes))

    def _group(self, flat: int, axes: tuple[str, ...]) -> tuple[int, ...]:
        base = list(self.coords(flat))
        idxs = [self.axis_index(a) for a in axes]
        members = []
        for j in range(self.group_size(axes)):
            c = list(base)
            for i in reversed(idxs):
                j, c[i] = divmod(j, self.shape[i])
            members.append(self.flat_index(c))
        return tuple(members)

    def __repr__(self) -> str:
        return f"AbstractMesh({dict(zip(self.axis_names, self.shape))!r})"


@dataclass(frozen=True, eq=False)
class Mesh:
    """A named device mesh bound to a backend.

    Build one with `Mesh.simulated` (every device lives in this process) or
    `Mesh.distributed` (one device per process over `torch.distributed`).
    Meshes compare equal when they have the same axes and the same backend.

    Examples:
        >>> import shardlib as sl
        >>> mesh = sl.Mesh.simulated({"dp": 2, "tp": 4})
        >>> mesh.axis_names, mesh.shape, mesh.size
        (('dp', 'tp'), (2, 4), 8)
        >>> mesh
        Mesh.simulated({'dp': 2, 'tp': 4})
    """

    abstract: AbstractMesh
    backend: Any

    @staticmethod
    def simulated(axes: Mapping[str, int]) -> Mesh:
        """A mesh whose devices all live in this process (deterministic, no processes)."""
        from ..collectives._simulated import SimulatedBackend

        names, shape = _parse_axes(axes, "Mesh.simulated")
        return Mesh(AbstractMesh(names, shape), SimulatedBackend())

    @staticmethod
    def distributed(axes: Mapping[str, int], device_type: str | None = None) -> Mesh:
        """A mesh with one device per process of the default `torch.distributed` group.

        Initializes the default process group from the `torchrun` environment
        if none is initialized. The mesh size must equal the world size.
        """
        from ..collectives._distributed import distributed_backend

        names, shape = _parse_axes(axes, "Mesh.distributed")
        mesh = AbstractMesh(names, shape)
        return Mesh(mesh, distributed_backend(mesh, device_type))

    @property
    def axis_names(self) -> tuple[str, ...]:
        return self.abstract.axis_names

    @property
    def shape(self) -> tuple[int, ...]:
        return self.abstract.shape

    @property
    def size(self) -> int:
        return self.abstract.size

    @property
    def axes(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.shape))

    @cached_property
    def local_devices(self) -> tuple[int, ...]:
        """Flat indices of the devices this process owns, in flat order."""
        return self.backend.local_devices(self.abstract)

    def __getattr__(self, name: str) -> Any:
        # Delegate the arithmetic helpers (coords, group, axis_size, ...).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.abstract, name)

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Mesh)
            and self.abstract == other.abstract
            and self.backend == other.backend
        )

    @cached_property
    def _hash(self) -> int:
        return hash((self.abstract, self.backend))

    def __hash__(self) -> int:  # meshes key every dispatch decision: hash once
        return self._hash

    def __repr__(self) -> str:
        return f"Mesh.{self.backend.kind}({self.axes!r})"


@lru_cache(maxsize=65536)
def _group(mesh: AbstractMesh, flat: int, axes: tuple[str, ...]) -> tuple[int, ...]:
    return mesh._group(flat, axes)
