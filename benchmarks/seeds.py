"""Mean and spread of benchmark results over seeds (shared by the benchmark scripts)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def mean_and_spread(results: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """For each run name in ``names`` (e.g. "base", "pds"): the mean over ``results`` (one per seed) of
    every numeric score, rounded to 4 decimals, plus ``"std"``, their population standard deviations."""
    summary = {}
    for name in names:
        keys = [k for k, v in results[0][name].items() if isinstance(v, (int, float))]
        values = {k: np.array([r[name][k] for r in results], dtype=float) for k in keys}
        summary[name] = {k: round(float(v.mean()), 4) for k, v in values.items()}
        summary[name]["std"] = {k: round(float(v.std()), 4) for k, v in values.items()}
    return summary


def add_seeds_argument(parser: argparse.ArgumentParser) -> None:
    """``--seeds N [N ...]``: run once per seed and report the mean and spread."""
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run once per seed; report mean ± std (overrides --seed)",
    )
