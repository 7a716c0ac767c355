"""Measuring memory in tests: the largest CPU allocation made while a function runs.

torch.profiler with ``profile_memory=True`` records every CPU allocation (size and
tag); the tests of O(local) random numbers and of the vocab-split embedding
gradient compare that largest allocation with a tensor's global and local sizes.
"""

from __future__ import annotations

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def largest_allocation(fn) -> int:
    """The largest CPU allocation (bytes) made while `fn` runs, from torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    sizes = [e.extra_fields.alloc_size for e in walk(tree) if e.tag == _EventType.Allocation]
    return max(sizes, default=0)
