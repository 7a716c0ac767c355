"""Measuring memory in tests: the largest CPU allocation made while a function runs, and
the peak of live bytes.

torch.profiler with ``profile_memory=True`` records every CPU allocation (size and
tag; a free is an allocation of negative size); the tests of O(local) random numbers
and of the vocab-split embedding gradient compare the largest allocation with a
tensor's global and local sizes, the ZeRO tests the live peak with bounds from shapes.
"""

from __future__ import annotations

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _allocations(fn) -> list:
    """The profiler's allocation events (frees included, as negative sizes) of `fn`, in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = (e for e in walk(tree) if e.tag == _EventType.Allocation)
    return sorted(events, key=lambda e: e.start_time_ns)


def largest_allocation(fn) -> int:
    """The largest CPU allocation (bytes) made while `fn` runs, from torch.profiler."""
    return max((e.extra_fields.alloc_size for e in _allocations(fn)), default=0)


def peak_live_bytes(fn) -> int:
    """Peak of live CPU bytes allocated while `fn` runs, above the start (torch.profiler)."""
    live = peak = 0
    for e in _allocations(fn):
        live += e.extra_fields.alloc_size
        peak = max(peak, live)
    return peak
