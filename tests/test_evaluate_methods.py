"""The methods ``mambamorph evaluate`` adds beside checkpoints: a checkpoint refined by instance
optimisation, training-free instance optimisation, and the optional peers (greedy, ConvexAdam,
ANTs SyN), on the tiny phantom pair."""

import sys

import numpy as np
import pytest
import torch

from mambamorph import evaluation as ev
from mambamorph.checkpoint import save_model
from mambamorph.errors import MambaMorphError
from mambamorph.metrics import dice_per_roi, folding_percent
from mambamorph.models import build_model, predict
from mambamorph.nn.spatial import warp
from mambamorph.optimize.instance import IOConfig, instance_optimise

ROIS = tuple(range(1, 17))  # compact ROI indices
# a short IO: one level, so the tests stay fast
SHORT_IO = IOConfig(levels=(4,), sim_grids=(2,), iterations=(3,), sim_strides=(1,))
pytestmark = pytest.mark.usefixtures("one_thread")


def _dice(pair, flow) -> float:
    """Mean Dice (%) of the moving label map warped by ``flow`` (1, 3, D0, D1, D2)."""
    seg = torch.from_numpy(pair["moving_seg"].astype(np.int64))[None, None]
    warped = warp(seg, flow.detach().cpu().float(), mode="nearest")[0, 0].numpy()
    return 100 * float(np.nanmean(dice_per_roi(warped, pair["fixed_seg"], ROIS)))


def _run(method, pair):
    return method.run(pair["moving"], pair["fixed"], pair["spacing"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two VoxelMorph checkpoints with a scaled-up head: one predicting a velocity (integrated),
    one predicting the displacement directly (``velocity=None``)."""
    out = {}
    for name, steps in (("svf", 7), ("disp", 0)):
        torch.manual_seed(1)
        model = build_model("voxelmorph", integration_steps=steps)
        with torch.no_grad():
            model.head.weight.normal_(0.0, 0.05)
        path = tmp_path_factory.mktemp("ckpt") / name / "checkpoints" / "best"
        save_model(path, model)
        out[name] = path.with_suffix(".safetensors")
    return out


def test_training_free_io_improves_over_the_identity(tiny_pair):
    word = ev.method_from_spec("io")
    assert word.name == "IO (training-free)" and word.kind == "optimisation"
    assert word.params is None and repr(IOConfig()) in word.source  # the defaults
    cfg = IOConfig()  # the defaults: levels 8, 4 on 32x48x32
    method = ev.io_method(cfg=cfg)
    flow = _run(method, tiny_pair)
    assert flow.shape == (1, 3, *tiny_pair["fixed"].shape[2:]) and flow.dtype == torch.float32
    initial = _dice(tiny_pair, torch.zeros_like(flow))
    # measured on this pair: 54.7 -> 77.4 (with 10 + 10 iterations only 63.5: on one
    # sub-lattice per iteration the similarity needs its 30 + 30 to converge)
    assert _dice(tiny_pair, flow) > initial + 10
    assert folding_percent(flow[0].numpy()) == 0
    # the runner is instance_optimise from the identity, nothing else
    ref = instance_optimise(tiny_pair["moving"], tiny_pair["fixed"], cfg=cfg).flow
    torch.testing.assert_close(flow, ref)


@pytest.mark.parametrize("kind", ["svf", "disp"])
def test_checkpoint_plus_io_starts_from_the_network(tiny_pair, checkpoints, kind):
    from mambamorph.checkpoint import load_model

    path = checkpoints[kind]
    method = ev.checkpoint_io_method(path, cfg=SHORT_IO)
    net = ev.checkpoint_method(path)
    assert method.name == "VoxelMorph + IO" and method.kind == "learned+optimisation"
    assert method.params == net.params and method.label == net.label
    flow = _run(method, tiny_pair)
    assert flow.shape == (1, 3, *tiny_pair["fixed"].shape[2:])
    # reference: the network's own output, then instance_optimise from its velocity (or flow)
    model, _ = load_model(path)
    with torch.no_grad():
        out = predict(model, tiny_pair["moving"], tiny_pair["fixed"])
    assert (out.velocity is None) == (kind == "disp")
    start = ({"init_velocity": out.velocity} if out.velocity is not None
             else {"init_flow": out.flow})
    ref = instance_optimise(tiny_pair["moving"], tiny_pair["fixed"], cfg=SHORT_IO, **start).flow
    torch.testing.assert_close(flow, ref)
    assert not torch.allclose(flow, out.flow)  # IO did move the field


def test_spec_words_and_io_suffix(checkpoints):
    path = str(checkpoints["svf"])
    m = ev.method_from_spec(path + "+io")
    assert m.name == "VoxelMorph + IO" and m.kind == "learned+optimisation"
    assert ev.method_from_spec(path + "+IO").kind == "learned+optimisation"
    assert ev.method_from_spec(" IO ").name == "IO (training-free)"
    for word in ("io", "convexadam", "greedy", "ants-syn", "ants", "identity", "initial"):
        assert word in ev.SPEC_WORDS
    names = [m.name for m in ev.unique_names([ev.checkpoint_io_method(path),
                                              ev.checkpoint_io_method(path)])]
    assert names == ["VoxelMorph + IO (svf/best)", "VoxelMorph + IO (svf/best) #2"]


@pytest.mark.parametrize("word, module, pip", [
    ("greedy", "picsl_greedy", "pip install picsl-greedy"),
    ("convexadam", "convexAdam", "pip install convexadam"),
    ("ants-syn", "ants", 'pip install "mambamorph[ants]"'),
])
def test_missing_peer_names_the_install_command(monkeypatch, word, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    with pytest.raises(MambaMorphError, match=pip.replace("[", r"\[").replace("]", r"\]")):
        ev.method_from_spec(word)


def test_greedy_improves_over_the_identity(tiny_pair):
    pytest.importorskip("picsl_greedy")
    pytest.importorskip("SimpleITK")
    method = ev.greedy_method(iterations=(20, 10))
    assert method.kind == "classical" and not method.device_bound
    flow = _run(method, tiny_pair)
    assert flow.shape == (1, 3, *tiny_pair["fixed"].shape[2:]) and flow.dtype == torch.float32
    assert _dice(tiny_pair, flow) > _dice(tiny_pair, torch.zeros_like(flow)) + 5


def test_greedy_field_reproduces_greedy_resampling():
    """The converted field (voxels, our axis order) warps like greedy itself, at anisotropic
    spacing (the mm -> voxel and axis conversions of greedy's warp)."""
    pytest.importorskip("picsl_greedy")
    pytest.importorskip("SimpleITK")
    from mambamorph.evaluation.peers import _greedy_register

    g = np.stack(np.meshgrid(*[np.arange(n) for n in (24, 32, 24)], indexing="ij")).astype(float)

    def blob(c, r):
        c, r = np.reshape(c, (3, 1, 1, 1)), np.reshape(r, (3, 1, 1, 1))
        return np.exp(-(((g - c) / r) ** 2).sum(0)).astype(np.float32)

    fixed, moving = blob((12, 16, 12), (5, 6, 4)), blob((13, 18, 11), (4, 6, 5))
    flow, greedy_warped = _greedy_register(moving, fixed, (1.0, 2.0, 1.5), (40, 20), "SSD", 1,
                                           reslice=True)
    assert flow.shape == (3, 24, 32, 24) and flow.dtype == np.float32
    ours = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, greedy_warped, atol=1e-4)
    assert np.abs(ours - fixed).mean() < 0.5 * np.abs(moving - fixed).mean()


def test_convexadam_returns_a_plausible_field(tiny_pair):
    pytest.importorskip("convexAdam")
    method = ev.method_from_spec("convexadam")
    assert method.kind == "classical" and "convexadam" in method.source
    flow = _run(method, tiny_pair)
    assert flow.shape == (1, 3, *tiny_pair["fixed"].shape[2:]) and flow.dtype == torch.float32
    assert torch.isfinite(flow).all()
    assert _dice(tiny_pair, flow) > _dice(tiny_pair, torch.zeros_like(flow))
