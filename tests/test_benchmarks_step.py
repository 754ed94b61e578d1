"""Smoke test of benchmarks/guidance_step.py on its tiny CPU setting: structure only, no timing thresholds."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_step.py"
KEYS = {"ratio", "ms", "floor_ms", "peak_mb", "evals", "floor_eval_ms", "floor_encoder_ms"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("guidance_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guidance_step_benchmark_tiny(capsys):
    bench = load_benchmark()
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    argv = ["--size", "tiny", "--resolution", "64", "--device", "cpu", "--threads", "1"]
    argv += ["--repeats", "2", "--warmup", "1", "--inversion-steps", "4", "--json"]
    report = bench.main(argv)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(report))  # the last line is the whole report
    assert set(report) == {"methods", "settings"}
    assert list(report["methods"]) == ["sds", "sdi", "dds", "pds", "vsd"]
    for name, result in report["methods"].items():
        assert KEYS <= set(result), name
        for key in ("ratio", "ms", "floor_ms", "floor_eval_ms", "floor_encoder_ms", "peak_mb"):
            assert math.isfinite(result[key]) and result[key] > 0, (name, key, result[key])
    assert report["methods"]["sdi"]["evals"] == 5
    # SDI runs inversion_steps + 1 evaluations against the same one-evaluation floor as SDS.
    assert report["methods"]["sdi"]["ratio"] > report["methods"]["sds"]["ratio"]
    settings = report["settings"]
    assert settings["resolution"] == 64 and settings["inversion_steps"] == 4 and settings["device"] == "cpu"

    bench.print_table(report)  # the human-readable form of the same report
    table = capsys.readouterr().out
    assert all(name in table for name in report["methods"]) and "Peak memory" in table
