"""The compatibility layer: torch ≥ 2.6 checkpoints, offline LPIPS, lazy heavy imports."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nerfstudio_distill.compat import checkpoints, lpips
from tests.conftest import ns_export, offline_env, run_cli


def _nerfstudio_like_checkpoint() -> bytes:
    """What nerfstudio 1.1.5 pickles: tensors plus numpy scalars (e.g. scheduler state)."""
    buf = io.BytesIO()
    state = {"step": 2, "pipeline": {"w": torch.ones(2)}, "schedulers": {"last_lr": [np.float64(1e-3)]}}
    state["scalers"] = {"scale": np.float32(2.0), "count": np.int64(7)}
    torch.save(state, buf)
    return buf.getvalue()


def _load_in_fresh_python(data: bytes, tmp_path: Path, install: bool) -> subprocess.CompletedProcess:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(data)
    code = (
        "from nerfstudio_distill.compat import checkpoints; checkpoints.install()\n" if install else ""
    ) + f"import torch; s = torch.load({str(path)!r}, map_location='cpu'); print(s['scalers']['count'])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_checkpoint_numpy_scalars_need_the_allow_list(tmp_path):
    data = _nerfstudio_like_checkpoint()
    without = _load_in_fresh_python(data, tmp_path, install=False)
    assert without.returncode != 0 and "Unsupported global" in without.stderr
    with_fix = _load_in_fresh_python(data, tmp_path, install=True)
    assert with_fix.returncode == 0, with_fix.stderr
    assert with_fix.stdout.strip() == "7"


def test_allow_list_is_only_numpy_scalars_and_dtypes():
    for entry in checkpoints.allowed_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        assert obj.__module__.startswith("numpy")
        assert obj.__name__ == "scalar" or (isinstance(obj, type) and issubclass(obj, np.dtype))


def test_weights_only_still_refuses_arbitrary_globals(tmp_path):
    checkpoints.install()

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))  # torch.save uses protocol 2
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system|Unsupported global"):
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------- offline LPIPS
class _RealMetric(torch.nn.Module):
    pass


def test_offline_tolerant_returns_real_metric_when_online():
    build = lpips.offline_tolerant(_RealMetric)
    assert isinstance(build(), _RealMetric)


def test_offline_tolerant_does_not_hide_other_errors():
    def broken(**kwargs):
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        lpips.offline_tolerant(broken)()


def _offline_nerfacto(monkeypatch, tmp_path):
    """Build a real NerfactoModel while every torch.hub download fails like an air gap."""
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    lpips.install()
    box = SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))
    config = NerfactoModelConfig(implementation="torch", hidden_dim=16, num_levels=4, log2_hashmap_size=10)
    return config.setup(scene_box=box, num_train_data=2, metadata={})


def test_nerfacto_builds_offline_with_one_warning_and_omits_lpips(monkeypatch, tmp_path):
    monkeypatch.setattr(lpips, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _offline_nerfacto(monkeypatch, tmp_path)
        _offline_nerfacto(monkeypatch, tmp_path)  # a second model: no second warning
    lpips_warnings = [w for w in caught if "LPIPS is unavailable" in str(w.message)]
    assert len(lpips_warnings) == 1
    assert isinstance(model.lpips, lpips.LPIPSUnavailable)

    image = torch.rand(8, 8, 3)
    outputs = {"rgb": image, "accumulation": torch.ones(8, 8, 1), "depth": torch.ones(8, 8, 1)}
    outputs.update(
        {f"prop_depth_{i}": torch.ones(8, 8, 1) for i in range(model.config.num_proposal_iterations)}
    )
    metrics, _ = model.get_image_metrics_and_images(outputs, {"image": image})
    assert "lpips" not in metrics and "psnr" in metrics


def test_patch_is_scoped_to_model_init(monkeypatch, tmp_path):
    import torchmetrics.image.lpip as tm

    real = tm.LearnedPerceptualImagePatchSimilarity
    _offline_nerfacto(monkeypatch, tmp_path)
    assert tm.LearnedPerceptualImagePatchSimilarity is real


# ------------------------------------------------------------- lazy heavy imports
def test_method_configs_import_does_not_import_diffusers_or_transformers():
    code = (
        "import sys, method_configs\n"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def broken_diffusers(tmp_path) -> dict[str, str]:
    """An environment whose `import diffusers` fails, as with a broken install."""
    fake = tmp_path / "site" / "diffusers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated broken diffusers install')\n")
    return offline_env(tmp_path, PYTHONPATH=str(fake.parent))


def test_broken_diffusers_does_not_break_ns_train_nerfacto(broken_diffusers, tmp_path):
    proc = run_cli(["ns-train", "nerfacto", "--help"], broken_diffusers, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nerfacto" in proc.stdout


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_offline_nerfacto_train_then_export_pointcloud(base_run, tmp_path):
    """Plain `ns-train nerfacto` for 2 steps offline (the shared base_run), then `ns-export pointcloud`."""
    run_dir = base_run.parent
    assert "LPIPS is unavailable" in (run_dir / "ns-train.stderr").read_text()
    (ckpt,) = base_run.glob("step-*.ckpt")
    allowed = {
        getattr(g, "__module__", "") + "." + g.__name__
        for g in checkpoints.allowed_globals()
        if not isinstance(g, tuple)
    }
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt))) <= allowed

    export = run_cli(
        ns_export(
            "pointcloud", run_dir, tmp_path / "export", "--num-points", "256", "--normal-method", "open3d"
        ),
        offline_env(tmp_path),
        tmp_path,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    ply = tmp_path / "export" / "point_cloud.ply"
    assert ply.exists() and b"element vertex" in ply.read_bytes()[:400]
