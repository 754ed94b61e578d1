"""Same seed, same run: seed the worker processes of nerfstudio 1.1.5's ``ParallelDataManager``.

nerfacto (and most built-in methods) sample their training rays in ``DataProcessor`` processes
started with ``spawn``. ``ns-train`` seeds torch, numpy and ``random`` in the main process only
(``--machine.seed``); a spawned process starts from a fresh, time-dependent RNG, so two runs with
the same seed train on different rays and end in different fields (measured: a 20-step nerfacto
differed by 0.25 in its weights). Everything else in a CPU run is deterministic.

The fix: ``parallel_datamanager.DataProcessor`` is replaced by :class:`SeededDataProcessor`, which
derives a seed from the main process's seed (``torch.initial_seed()``, i.e. ``--machine.seed`` plus
the rank) and its own creation index, and seeds torch, numpy and ``random`` at the start of the
worker. It draws nothing from the main process's RNG, so the main process's random stream is the
same as upstream's. The subclass lives in this module (not patched onto nerfstudio's class) because
a spawned process re-imports classes by name: it must find the seeding there too.
"""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import torch
from nerfstudio.data.datamanagers import parallel_datamanager
from nerfstudio.data.datamanagers.parallel_datamanager import DataProcessor

_counter = itertools.count()


def worker_seed(parent_seed: int, index: int) -> int:
    """A 32-bit seed for the ``index``-th worker of a process seeded with ``parent_seed``."""
    return (parent_seed * 1_000_003 + 7919 * (index + 1)) % (2**32)


class SeededDataProcessor(DataProcessor):
    """nerfstudio's DataProcessor, seeded from the main process (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = worker_seed(torch.initial_seed(), next(_counter))

    def run(self) -> None:
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        random.seed(self.seed)
        super().run()


DETERMINISTIC_ENV = "NERFSTUDIO_DISTILL_DETERMINISTIC"
"""Set to 1 to make every method's run reproducible with several CPU threads (see :func:`deterministic`)."""


def deterministic(enabled: bool = True) -> None:
    """Use torch's deterministic kernels (``warn_only``: an op without one warns instead of failing).

    With more than one CPU thread, the backward of tensor indexing (``index_put_`` with accumulation, the
    gradient of nerfacto's torch hash grid) adds in a thread-dependent order, so two runs differ by float
    rounding that training amplifies; the deterministic kernel sorts first.
    """
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def install() -> None:
    """Make ``ParallelDataManager`` start :class:`SeededDataProcessor` workers (idempotent); with
    ``NERFSTUDIO_DISTILL_DETERMINISTIC=1`` also turn on :func:`deterministic` for every method."""
    parallel_datamanager.DataProcessor = SeededDataProcessor
    if os.environ.get(DETERMINISTIC_ENV, "").strip() == "1":
        deterministic()
