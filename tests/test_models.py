"""MambaMorph and VoxelMorph models: exact parameter counts (SPEC.md §1-3), shapes at cubic and
non-cubic sizes, near-identity start, gradients to every parameter, a few optimisation steps
that lower the Dice loss, weights-only state dicts and rebuilding from the config. For every
registered model: option errors (the config base) and, for the shipped weights, loading and a
forward pass."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest
import torch

import mambamorph
from mambamorph.errors import InputError
from mambamorph.losses import soft_dice_loss
from mambamorph.models import build_model, count_parameters, list_models
from mambamorph.models.mambamorph import MambaMorph, MambaMorphConfig
from mambamorph.models.transmorph import TransMorphConfig
from mambamorph.models.voxelmorph import VoxelMorph, VoxelMorphConfig
from mambamorph.models.xmorpher import XMorpherConfig
from mambamorph.nn.spatial import warp

NAMES = ["mambamorph", "mambamorph-reg", "voxelmorph", "voxelmorph-feat"]

COUNTS = [
    ("mambamorph", {}, 7_590_531),
    ("mambamorph", {"readout_head": True}, 7_594_646),
    ("mambamorph-reg", {}, 7_305_459),
    ("voxelmorph", {}, 92_179),
    ("voxelmorph", {"config": "paper"}, 327_331),
    ("voxelmorph-feat", {}, 154_051),
    ("voxelmorph-feat", {"readout_head": True}, 158_166),
]


@pytest.fixture(scope="module")
def models():
    """One instance of each registered model (built once: the Mamba models take a moment)."""
    torch.manual_seed(0)
    return {name: build_model(name) for name in NAMES}


def pair(shape, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, *shape, generator=g), torch.rand(batch, 1, *shape, generator=g))


@pytest.mark.parametrize("name,overrides,expected", COUNTS,
                         ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}"
                              for n, o, _ in COUNTS])
def test_parameter_counts(name, overrides, expected):
    assert count_parameters(build_model(name, **overrides)) == expected


def test_residual_and_readout_do_not_change_the_registration_weights():
    base = build_model("mambamorph-reg")
    res = build_model("mambamorph-reg", residual=True)
    assert [(k, v.shape) for k, v in base.state_dict().items()] == \
        [(k, v.shape) for k, v in res.state_dict().items()]
    ro = build_model("mambamorph", readout_head=True)
    assert sum(p.numel() for p in ro.readout_head.parameters()) == 4_115
    feats = ro.features(torch.rand(1, 1, 16, 16, 16))
    assert ro.readout(feats).shape == (1, 3, 8, 8, 8)
    with pytest.raises(InputError):
        build_model("mambamorph").readout(feats)


@pytest.mark.parametrize("shape", [(32, 32, 32), (32, 48, 64)])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_near_identity(models, name, shape):
    model = models[name].eval()
    moving, fixed = pair(shape)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.flow.shape == (1, 3, *shape)
    assert out.flow.dtype == torch.float32
    assert torch.isfinite(out.flow).all()
    # the N(0, 1e-5) head gives a near-zero field at initialisation
    assert out.flow.abs().max().item() < 1e-2
    assert out.velocity is not None and torch.isfinite(out.velocity).all()
    if name.startswith("voxelmorph"):
        assert out.velocity.shape == (1, 3, *(s // 2 for s in shape))  # half-resolution velocity
    else:
        assert out.velocity.shape == (1, 3, *shape)


def test_batch_of_two_matches_single_items(models):
    model = models["mambamorph"].eval()
    moving, fixed = pair((32, 32, 32), batch=2, seed=3)
    with torch.no_grad():
        both = model(moving, fixed).velocity
        one = model(moving[1:], fixed[1:]).velocity
    torch.testing.assert_close(both[1:], one, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(models, name):
    model = models[name].train()
    model.zero_grad(set_to_none=True)
    moving, fixed = pair((32, 32, 32), seed=1)
    out = model(moving, fixed)
    weights = torch.randn(out.flow.shape, generator=torch.Generator().manual_seed(5))
    # the flow of a 1e-5 head is ~1e-6: scale the loss so gradients are far from underflow
    (1e4 * (out.flow * weights).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"all-zero gradient: {zero}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def _blob_pair(shape=(32, 32, 32)):
    """Two spheres in the fixed image and the same spheres shifted by 2-3 voxels in the moving."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape],
                                      indexing="ij"))

    def sphere(centre, radius):
        c = torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)
        return ((grid - c).square().sum(0) <= radius ** 2).float()

    fixed_lab = torch.stack([sphere((12, 12, 14), 6), sphere((21, 20, 18), 5)])
    moving_lab = torch.stack([sphere((14, 10, 16), 6), sphere((18, 22, 19), 5)])
    fixed_img = (fixed_lab[0] + 0.5 * fixed_lab[1])[None, None]
    moving_img = (moving_lab[0] + 0.5 * moving_lab[1])[None, None]
    return moving_img, fixed_img, moving_lab[None], fixed_lab[None]


@pytest.mark.parametrize("name,lr", [("mambamorph", 3e-3), ("voxelmorph", 1e-3)])
def test_a_few_adam_steps_lower_the_dice_loss(name, lr):
    torch.manual_seed(0)
    model = build_model(name).train()
    moving, fixed, moving_lab, fixed_lab = _blob_pair()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(8):
        out = model(moving, fixed)
        loss = soft_dice_loss(warp(moving_lab, out.flow), fixed_lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = soft_dice_loss(warp(moving_lab, model(moving, fixed).flow), fixed_lab).item()
    assert final < losses[0] - 0.02, (losses, final)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_holds_weights_only(models, name):
    model = models[name]
    state = model.state_dict()
    params = dict(model.named_parameters())
    assert set(state) == set(params), sorted(set(state) ^ set(params))
    assert not any("grid" in k or "pos" in k for k in state)


@pytest.mark.parametrize("name,overrides", [
    ("mambamorph", {}), ("mambamorph-reg", {"residual": True}), ("voxelmorph", {}),
    ("voxelmorph", {"config": "paper"}), ("voxelmorph-feat", {"readout_head": True}),
])
def test_config_rebuilds_the_model(name, overrides):
    torch.manual_seed(0)
    model = build_model(name, **overrides).eval()
    assert is_dataclass(model.config)
    cfg = json.loads(json.dumps(asdict(model.config)))  # the checkpoint format's round trip
    clone = build_model(name, **cfg).eval()
    assert clone.config == model.config
    head = model.registration.head if isinstance(model, MambaMorph) else model.head
    with torch.no_grad():
        head.weight.normal_(0, 1e-2)  # a non-trivial field, so the comparison means something
        clone.load_state_dict(model.state_dict())  # strict: same names and shapes
        moving, fixed = pair((32, 32, 32), seed=2)
        torch.testing.assert_close(clone(moving, fixed).flow, model(moving, fixed).flow)


def test_config_options_and_errors():
    assert build_model("mambamorph-reg").config.use_features is False
    assert isinstance(build_model("voxelmorph-feat"), VoxelMorph)
    m = MambaMorph(MambaMorphConfig(embed_dim=8, head_channels=4, num_stages=2))
    out = m(*pair((16, 16, 8)))  # two stages: multiples of 8
    assert out.flow.shape == (1, 3, 16, 16, 8)
    vm = build_model("voxelmorph", unet_half_res=True)
    assert vm(*pair((32, 16, 32))).flow.shape == (1, 3, 32, 16, 32)
    assert build_model("voxelmorph", integration_steps=0)(*pair((16, 16, 16))).velocity is None
    with pytest.raises(InputError):
        build_model("mambamorph", not_an_option=1)
    with pytest.raises(InputError):
        build_model("mambamorph-reg", readout_head=True)
    with pytest.raises(InputError):
        build_model("voxelmorph", config="nope")
    with pytest.raises(InputError):
        build_model("voxelmorph", config="paper", enc_features=(8, 8, 8, 8))
    with pytest.raises(InputError):
        build_model("voxelmorph", unet_half_res=True, int_downsize=1)
    with pytest.raises(InputError):
        build_model("mambamorph", embed_dim=95)


@pytest.mark.parametrize("name", ["mambamorph", "voxelmorph"])
def test_bad_inputs_raise_input_error(models, name):
    model = models[name]
    with pytest.raises(InputError):
        model(*pair((32, 32, 24)))  # not a multiple of 16
    with pytest.raises(InputError):
        model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 48))
    with pytest.raises(InputError):
        model(torch.rand(1, 2, 32, 32, 32), torch.rand(1, 2, 32, 32, 32))


def test_options_beyond_the_paper_run():
    torch.manual_seed(0)
    small = dict(embed_dim=16, head_channels=8)
    for opts in ({"residual": True}, {"bidirectional": True}):
        out = build_model("mambamorph", **small, **opts)(*pair((32, 32, 32)))
        assert out.flow.shape == (1, 3, 32, 32, 32) and torch.isfinite(out.flow).all()


@pytest.mark.parametrize("name,overrides", [("mambamorph", dict(embed_dim=16, head_channels=8)),
                                            ("voxelmorph-feat", {})])
def test_gradient_checkpointing_is_exact(name, overrides):
    torch.manual_seed(0)
    a = build_model(name, **overrides).train()
    b = build_model(name, **overrides, checkpoint=True).train()
    b.load_state_dict(a.state_dict())
    moving, fixed = pair((32, 32, 32), seed=4)
    w = torch.randn(1, 3, 32, 32, 32)
    flows, grads = [], []
    for m in (a, b):
        flow = m(moving, fixed).flow
        (1e4 * (flow * w).sum()).backward()
        flows.append(flow.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(flows[1], flows[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["mambamorph", "voxelmorph"])
def test_predict_channels_last_matches_plain_forward(name):
    """The CPU inference path (channels-last 3D) computes the same field as a plain forward."""
    from mambamorph.models import predict

    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():  # a non-trivial field: enlarge the near-zero flow-head weights
        for pname, p in model.named_parameters():
            if "head" in pname and p.dim() > 1:
                p.normal_(0, 1e-2)
    mov, fix = torch.rand(1, 1, 32, 48, 32), torch.rand(1, 1, 32, 48, 32)
    with torch.no_grad():
        ref = model(mov, fix).flow
    out = predict(model, mov, fix).flow
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()))


# ------------------------------------------------------------------ every registered model
@pytest.mark.parametrize("name", list_models())
def test_unknown_option_is_an_input_error_naming_it_and_the_valid_ones(name):
    with pytest.raises(InputError) as err:
        build_model(name, not_an_option=1, in_channels=1)
    msg = str(err.value)
    assert "not_an_option" in msg
    valid = msg.split("valid options:")[1]
    assert "in_channels" in valid and "not_an_option" not in valid


@pytest.mark.parametrize("value", ["one", 0, -1, 1.5, True, None, [1]])
@pytest.mark.parametrize("name", list_models())
def test_bad_value_is_an_input_error_naming_the_option(name, value):
    with pytest.raises(InputError, match=r"config: in_channels"):
        build_model(name, in_channels=value)


@pytest.mark.parametrize("cls,overrides,expected", [
    # YAML reads 1e-1 as a string: the float it spells; an int where a float is expected
    (TransMorphConfig, {"drop_path_rate": "1e-1", "mlp_ratio": 2}, {"drop_path_rate": 0.1,
                                                                   "mlp_ratio": 2.0}),
    # JSON / YAML lists become tuples
    (XMorpherConfig, {"window_size": [2, 3, 2], "depths": [1, 1]},
     {"window_size": (2, 3, 2), "depths": (1, 1)}),
    (MambaMorphConfig, {"scan_impl": None}, {"scan_impl": None}),
    (VoxelMorphConfig, {"config": "paper"}, {"enc_features": (16, 32, 32, 32)}),
])
def test_values_are_converted_to_their_option_type(cls, overrides, expected):
    if "depths" in overrides:
        overrides = {**overrides, "num_heads": [3, 6]}
    cfg = cls.from_overrides(**overrides)
    for key, value in expected.items():
        got = getattr(cfg, key)
        assert got == value and type(got) is type(value), (key, got)


@pytest.mark.parametrize("cls,overrides,match", [
    (TransMorphConfig, {"drop_path_rate": "lots"}, "drop_path_rate: expected a finite number"),
    (XMorpherConfig, {"mlp_ratio": float("inf")}, "mlp_ratio: expected a finite number"),
    (XMorpherConfig, {"window_size": [2, 2]}, "window_size: expected a list of 3 integers"),
    (XMorpherConfig, {"window_size": [2, 2, "x"]}, "window_size: expected a list of 3 integers"),
    (VoxelMorphConfig, {"enc_features": 16}, "enc_features: expected a list of integers"),
    (MambaMorphConfig, {"scan_impl": 3}, "scan_impl: expected a string or null"),
    (MambaMorphConfig, {"residual": "yes"}, "residual: expected a boolean"),
    # range problems are reported together
    (XMorpherConfig, {"search_factor": 2, "embed_dim": 47},
     "embed_dim must be even.*search_factor must be odd"),
    (TransMorphConfig, {"num_heads": (4, 5, 8)}, r"level widths \[96, 192, 384\] must divide"),
])
def test_bad_values_name_the_option_and_the_problem(cls, overrides, match):
    with pytest.raises(InputError, match=match):
        cls.from_overrides(**overrides)


def test_presets_are_an_option_only_where_there_are_presets():
    assert "config" in VoxelMorphConfig.option_names()
    assert "config" not in MambaMorphConfig.option_names()
    with pytest.raises(InputError, match="unknown option"):
        MambaMorphConfig.from_overrides(config="paper")
    assert VoxelMorphConfig.from_overrides(config=None) == VoxelMorphConfig()
    for bad in ("nope", ["paper"]):
        with pytest.raises(InputError, match="unknown config"):
            VoxelMorphConfig.from_overrides(config=bad)


WEIGHTS = sorted((Path(mambamorph.__file__).parent / "weights").glob("*.safetensors"))


def test_the_package_ships_weights():
    assert len(WEIGHTS) >= 2, WEIGHTS


@pytest.mark.parametrize("path", WEIGHTS, ids=[p.stem for p in WEIGHTS])
def test_shipped_weights_load_with_their_keys_and_run(path):
    """Each shipped checkpoint rebuilds its model with exactly the file's state-dict keys, holds
    the file's values, and runs a forward pass at 32^3."""
    from safetensors.torch import load_file

    from mambamorph.checkpoint import load_model

    model, info = load_model(path)
    state = load_file(str(path))
    assert sorted(model.state_dict()) == sorted(state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key].to(value.dtype), rtol=0, atol=0)
    with torch.no_grad():
        out = model(*pair((32, 32, 32), seed=6))
    assert out.flow.shape == (1, 3, 32, 32, 32) and torch.isfinite(out.flow).all()
