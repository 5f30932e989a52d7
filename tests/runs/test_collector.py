"""A worker's garbage collector (``tune_collector``): what the process holds at start is frozen
out of collections, young collections are rarer — and cycles made afterwards are still
collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from keyshift.runs.worker import COLLECTOR_THRESHOLDS, tune_collector


@pytest.fixture
def collector() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_the_worker_freezes_what_it_holds_and_collects_rarely(collector: None) -> None:
    held = [Node() for _ in range(100)]
    tune_collector()
    assert gc.get_threshold() == COLLECTOR_THRESHOLDS
    assert COLLECTOR_THRESHOLDS[0] > 700  # rarer than the default
    assert gc.get_freeze_count() >= len(held)

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after the freeze: garbage once dropped
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # reference counting alone cannot free a cycle
    gc.collect()
    assert gone() is None
