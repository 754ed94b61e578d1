"""Training on several processes (``--machine.num-devices N``): one field, trained on the average of the
ranks' gradients (nerfstudio #1847: a loss computed through ``pipeline.model`` is not averaged).

The processes run on CPU with gloo (tests/ddp_harness.py), as nerfstudio's launcher runs GPUs with NCCL.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from nerfstudio_distill.pipelines import distributed
from nerfstudio_distill.pipelines.trainer import DistillError, DistillTrainerConfig, check_machine
from tests.ddp_harness import ddp_worker, spawn, tiny_edit, tiny_text_to_3d, train_worker


def test_a_loss_through_the_unwrapped_model_is_not_averaged(tmp_path):
    """The bug, in torch alone: through DDP's wrapper the ranks' gradients are averaged, through its
    ``.module`` (nerfstudio's ``pipeline.model``) each rank keeps its own; ``average_gradients`` gives
    DDP's result, also for a parameter only one rank used (find_unused_parameters) or none did."""
    spawn(ddp_worker, 2, tmp_path)
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    own = [g["unwrapped"]["used.weight"] for g in grads]
    assert not torch.allclose(own[0], own[1])
    for r, g in enumerate(grads):
        for mode in ("wrapped", "partly wrapped"):
            ours = g[mode.replace("wrapped", "averaged")]
            assert ours.keys() == g[mode].keys()
            for name, expected in g[mode].items():
                if expected is None:
                    assert ours[name] is None, (r, mode, name)
                else:
                    torch.testing.assert_close(ours[name], expected, msg=f"{r} {mode} {name}")
        torch.testing.assert_close(g["averaged"]["used.weight"], (own[0] + own[1]) / 2)
        assert g["averaged"]["unused.weight"] is None  # no rank used it
        assert g["partly averaged"]["unused.weight"] is not None  # rank 1 did


def test_step_generators_differ_by_rank_and_rank_0_is_the_single_process_stream():
    for seed in (7, 10**6):  # 10**6 * 1_000_003 overflows the 32 bits torch's CPU generator keeps
        draws = [torch.rand(3, generator=distributed.step_generator(seed, 5, r)) for r in range(3)]
        assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
        single = torch.Generator().manual_seed(seed * 1_000_003 + 5)  # the pipelines' stream before ranks
        assert torch.equal(draws[0], torch.rand(3, generator=single))


def test_more_devices_than_gpus_is_one_line(monkeypatch):
    config = DistillTrainerConfig(method_name="pds-edit")
    config.machine.num_devices = 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DistillError, match="no GPU is visible: pass --machine.num-devices 1"):
        check_machine(config)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistillError, match="only 1 GPU"):
        check_machine(config)
    config.machine.num_devices = 1
    check_machine(config)


# ----------------------------------------------------------------------------------------- training
def averaged_run(config: DistillTrainerConfig, world_size: int) -> dict[str, torch.Tensor]:
    """The reference: ONE process that, every step, computes the gradient of each rank's draws (its view,
    t and noise from the rank's step generator, its sampling from the rank's torch stream) and steps the
    optimizer on their average. Returns the field's final state."""
    from nerfstudio.scripts.train import _set_random_seed

    streams = []
    for rank in reversed(range(world_size)):  # each rank's torch stream after its setup; rank 0's trains
        _set_random_seed(config.machine.seed + rank)
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        streams.insert(0, torch.get_rng_state())
    pipeline = trainer.pipeline
    one_rank = pipeline.get_train_loss_dict

    def every_rank(step: int):
        params = [p for p in pipeline.parameters() if p.requires_grad]
        grads = []  # each rank's own gradients, summed as an all-reduce sums them: g_0 + g_1
        for rank in range(world_size):
            pipeline.rank = rank
            torch.set_rng_state(streams[rank])
            for p in params:
                p.grad = None
            outputs, losses, metrics = one_rank(step)
            functools.reduce(torch.add, losses.values()).backward()
            streams[rank] = torch.get_rng_state()
            grads.append([p.grad for p in params])
        pipeline.rank = 0
        for p, own in zip(params, zip(*grads, strict=True), strict=True):
            given = [g for g in own if g is not None]
            p.grad = None if not given else functools.reduce(torch.add, given) / world_size
        return outputs, {"averaged": torch.zeros((), requires_grad=True)}, metrics

    pipeline.get_train_loss_dict = every_rank
    trainer.train()
    return pipeline.model.state_dict()


RUNS = {
    "one-pass": dict(chunk_size=1 << 14),
    "two-pass": dict(chunk_size=1000),
    "in2n": dict(method="in2n-edit"),
    "splats": dict(method="pds-splatfacto"),
}
"""The runs of :func:`ddp_runs` (a view has 48 x 48 = 2304 rays: a chunk of 1000 is the two-pass backward)."""


@pytest.fixture(scope="module")
def ddp_runs(tiny_scene, prior_folder, tmp_path_factory):
    """3 steps of each of RUNS and of sds-nerfacto ("text-to-3d") in 2 gloo processes:
    {name: (config, [rank 0's result, rank 1's])}."""
    from tests.tiny_sd import build_tiny_sd

    folder = tmp_path_factory.mktemp("ddp")
    configs = {
        name: tiny_edit(tiny_scene, prior_folder, folder, steps=3, timestamp=name, **options)
        for name, options in RUNS.items()
    }
    sd = build_tiny_sd(folder / "tiny_sd")
    configs["text-to-3d"] = tiny_text_to_3d(sd, folder, steps=3, timestamp="text-to-3d")
    spawn(train_worker, 2, folder, list(configs.values()))
    return {
        name: (config, [torch.load(folder / f"{i}-rank{r}.pt") for r in range(2)])
        for i, (name, config) in enumerate(configs.items())
    }


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), (what, key)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["one-pass", "two-pass", "splats"])
def test_two_processes_train_one_field_on_the_average_of_their_views(ddp_runs, tmp_path, run):
    """pds-edit in 2 gloo processes, with the one-pass backward and with the two-pass chunked one, and
    pds-splatfacto (whole-view renders, Gaussians kept in number): the ranks draw different t (and views),
    end with identical scenes, and these equal a single process that averages the same two ranks'
    gradients."""
    config, ranks = ddp_runs[run]
    assert len(ranks[0]["t"]) == 3 and ranks[0]["t"] != ranks[1]["t"]
    assert_same_state(ranks[0]["state"], ranks[1]["state"], run)
    reference = averaged_run(dataclasses.replace(config, output_dir=tmp_path), world_size=2)
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-7, msg=f"{run} {key}")
    assert (config.get_base_dir() / "config.yml").is_file()  # written once, by rank 0


@pytest.mark.slow
def test_in2n_ranks_edit_different_views_and_share_them(ddp_runs):
    """in2n-edit in 2 gloo processes: each update edits two views, one per rank, and both ranks end with
    the same six edited images and the same field."""
    _, ranks = ddp_runs["in2n"]
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "in2n")
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])
    images, photos = ranks[0]["images"], ranks[0]["photos"]
    edited = [not torch.equal(image, photo) for image, photo in zip(images, photos, strict=True)]
    # updates at steps 0, 1 and 2: views 0 and 1, 2 and 3, 4 and 5
    assert edited == [True] * 6 + [False] * (len(edited) - 6)


@pytest.mark.slow
def test_text_to_3d_ranks_draw_their_own_cameras_and_share_one_field(ddp_runs):
    """sds-nerfacto (tiny Stable Diffusion) in 2 gloo processes: different t per rank, one field."""
    _, ranks = ddp_runs["text-to-3d"]
    assert len(ranks[0]["t"]) == 3 and ranks[0]["t"] != ranks[1]["t"]
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "text-to-3d")
