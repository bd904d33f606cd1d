"""XMorpher baseline: parameter count, shapes, cross attention vs plain references, training."""

import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from mambamorph.errors import InputError
from mambamorph.losses import soft_dice_loss
from mambamorph.models import build_model, count_parameters, list_models
from mambamorph.models.xmorpher import CATBlock, CrossWindowAttention, XMorpher, XMorpherConfig
from mambamorph.nn.spatial import warp

PAPER_PARAMS = 8_400_000  # MambaMorph paper, Table 2
DEFAULT_PARAMS = 8_100_483  # this build's default config (no dead layer; see the module docstring)


def naive_cross_attention(attn: CrossWindowAttention, x, ctx):
    """Window by window with explicit, clipped search boxes: the spec of the fast path."""
    n, g0, g1, g2, c = x.shape
    h = attn.num_heads
    d = c // h
    grid = (g0, g1, g2)
    win = [min(w, g) for w, g in zip(attn.window_size, grid)]
    r = [(attn.search_factor - 1) // 2 * w for w in win]
    q = attn.q(x)
    k, v = attn.kv(ctx).chunk(2, dim=-1)
    out = torch.zeros_like(q)
    for i0 in range(0, g0, win[0]):
        for i1 in range(0, g1, win[1]):
            for i2 in range(0, g2, win[2]):
                start = (i0, i1, i2)
                base = tuple(slice(s, s + w) for s, w in zip(start, win))
                box = tuple(slice(max(s - rr, 0), min(s + w + rr, g))
                            for s, w, rr, g in zip(start, win, r, grid))
                qs = q[(slice(None),) + base]
                qq = qs.reshape(n, -1, h, d)
                ks = k[(slice(None),) + box].reshape(n, -1, h, d)
                vs = v[(slice(None),) + box].reshape(n, -1, h, d)
                a = torch.einsum("nqhd,nkhd->nhqk", qq, ks).mul(d ** -0.5).softmax(-1)
                o = torch.einsum("nhqk,nkhd->nqhd", a, vs)
                out[(slice(None),) + base] = o.reshape(qs.shape)
    return attn.proj(out)


@pytest.mark.parametrize("grid, window, factor", [
    ((3, 5, 4), (2, 2, 2), 3),   # partial windows at the far faces
    ((4, 6, 4), (2, 3, 2), 3),   # anisotropic window
    ((1, 3, 2), (2, 2, 2), 3),   # grid smaller than the window: clamped to (1, 2, 2)
    ((6, 6, 6), (2, 2, 2), 5),   # wider search
    ((4, 4, 4), (2, 2, 2), 1),   # search window == base window
])
def test_cross_attention_matches_naive_reference(grid, window, factor):
    torch.manual_seed(1)
    attn = CrossWindowAttention(8, 2, window, factor).double()
    x = torch.randn(2, *grid, 8, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, *grid, 8, dtype=torch.float64, requires_grad=True)
    fast, ref = attn(x, ctx), naive_cross_attention(attn, x, ctx)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    gf = torch.autograd.grad(fast.square().sum(), [x, ctx] + list(attn.parameters()))
    gr = torch.autograd.grad(ref.square().sum(), [x, ctx] + list(attn.parameters()))
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_cross_attention_with_search_equal_to_base_is_windowed_self_attention():
    """factor 1 and context == x: torch's own MultiheadAttention applied per window."""
    torch.manual_seed(2)
    c, h, win, grid = 12, 3, (2, 2, 2), (4, 6, 2)
    attn = CrossWindowAttention(c, h, win, search_factor=1)
    mha = nn.MultiheadAttention(c, h, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(1, *grid, c)
    # (1, G0, G1, G2, C) -> (nW, 8, C), windows in raster order
    n0, n1, n2 = (g // w for g, w in zip(grid, win))
    xw = x.view(n0, 2, n1, 2, n2, 2, c).permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, 8, c)
    ref, _ = mha(xw, xw, xw, need_weights=False)
    ref = ref.view(n0, n1, n2, 2, 2, 2, c).permute(0, 3, 1, 4, 2, 5, 6).reshape(1, *grid, c)
    torch.testing.assert_close(attn(x, x), ref, rtol=1e-5, atol=1e-6)


def test_cat_block_updates_each_branch_from_the_other():
    torch.manual_seed(3)
    blk = CATBlock(8, 2, (2, 2, 2), 3, mlp_ratio=2.0, qkv_bias=True).eval()
    m, f = torch.randn(1, 4, 4, 4, 8), torch.randn(1, 4, 4, 4, 8)
    out = blk(torch.cat([m, f]))
    # shared weights: swapping the branches swaps the outputs
    torch.testing.assert_close(blk(torch.cat([f, m])), out.flip(0))
    # the moving half depends on the fixed half
    out2 = blk(torch.cat([m, f + 1.0 * torch.randn_like(f)]))
    assert (out2[0] - out[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="even batch"):
        blk(m)


def test_parameter_count_within_5_percent_of_paper():
    model = build_model("xmorpher")
    n = count_parameters(model)
    assert n == DEFAULT_PARAMS
    assert abs(n - PAPER_PARAMS) / PAPER_PARAMS < 0.05
    # the XMorpher paper's own depths (2, 2, 6, 2) and MLP ratio 4, for reference
    paper_cfg = XMorpherConfig(depths=(2, 2, 6, 2), mlp_ratio=4.0)
    assert count_parameters(XMorpher(paper_cfg)) == 14_798_595


def test_registered_and_config_round_trips_through_json():
    assert "xmorpher" in list_models()
    model = build_model("xmorpher", embed_dim=16, num_heads=(1, 2, 4, 8))
    cfg = json.loads(json.dumps(asdict(model.config)))  # tuples become lists
    rebuilt = build_model("xmorpher", **cfg)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())


def test_checkpoints_from_before_the_shared_patch_merging_still_load():
    """The merge convs were once named ``merge.i.reduce``; such state dicts load unchanged."""
    model = build_model("xmorpher", embed_dim=16, num_heads=(1, 2, 4, 8))
    old = {k.replace(".reduction.", ".reduce."): v.clone() + 1.0
           for k, v in model.state_dict().items()}
    assert sum(".reduce." in k for k in old) == 6
    model.load_state_dict(old)  # strict
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, old[k.replace(".reduction.", ".reduce.")])


def test_state_dict_holds_weights_only():
    model = build_model("xmorpher")
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {k for k, _ in model.named_parameters()}


@pytest.mark.parametrize("shape, batch", [((32, 32, 32), 1), ((32, 48, 64), 2)])
def test_forward_shapes_and_near_identity_at_init(shape, batch):
    model = build_model("xmorpher").eval()
    mov, fix = torch.rand(batch, 1, *shape), torch.rand(batch, 1, *shape)
    with torch.no_grad():
        out = model(mov, fix)
    assert out.flow.shape == (batch, 3, *shape)
    assert out.velocity is None
    assert torch.isfinite(out.flow).all()
    assert 0 < out.flow.abs().max() < 1e-2  # voxels


def test_gradients_reach_every_parameter():
    # 32x48x64 keeps >1 token in every bottom window (a lone key makes the query weights moot)
    model = build_model("xmorpher", embed_dim=16, num_heads=(1, 2, 4, 8))
    out = model(torch.rand(1, 1, 32, 48, 64), torch.rand(1, 1, 32, 48, 64))
    (out.flow * torch.randn_like(out.flow)).sum().backward()
    missing = [k for k, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fixed_image_changes_moving_branch_features():
    torch.manual_seed(4)
    model = build_model("xmorpher").eval()
    mov, fix = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        feats = model.encode(mov, fix)
        feats_other_fixed = model.encode(mov, torch.rand_like(fix))
        feats_swapped = model.encode(fix, mov)
    for level, ((m, f), (m2, _), (fs, ms)) in enumerate(
            zip(feats, feats_other_fixed, feats_swapped)):
        assert m.shape == (1, 48 << level, 8 >> level, 8 >> level, 8 >> level)
        assert (m - m2).abs().max() > 1e-4, f"level {level}: moving branch ignores the fixed image"
        # one set of weights for both branches: swapping the inputs swaps the branches
        torch.testing.assert_close(fs, f, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ms, m, rtol=1e-4, atol=1e-5)


def test_bad_inputs_and_configs_raise_input_error():
    model = build_model("xmorpher", embed_dim=16, num_heads=(1, 2, 4, 8))
    with pytest.raises(InputError, match="differ in shape"):
        model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 16))
    with pytest.raises(InputError, match=r"expected moving \(B, 1,"):
        model(torch.rand(1, 2, 32, 32, 32), torch.rand(1, 2, 32, 32, 32))
    with pytest.raises(InputError, match="multiples of 4"):
        model(torch.rand(1, 1, 32, 32, 30), torch.rand(1, 1, 32, 32, 30))
    for bad in (dict(search_factor=2), dict(num_heads=(5, 6, 12, 24)), dict(depths=(2, 2)),
                dict(window_size=(2, 2)), dict(embed_dim=47), dict(drop_path_rate=1.0)):
        with pytest.raises(InputError, match="xmorpher config"):
            XMorpherConfig(**bad)


def test_adam_steps_reduce_soft_dice_loss():
    torch.manual_seed(5)
    s = 32
    ax = torch.arange(s, dtype=torch.float32) - s / 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")

    def blobs(shift):
        a = ((z - shift) ** 2 + y ** 2 + (x - 4) ** 2 < 36).float()
        b = ((z - shift) ** 2 + (y - 6) ** 2 + (x + 5) ** 2 < 25).float() * (1 - a)
        return torch.stack([a, b])[None]  # (1, 2, 32, 32, 32) one-hot ROIs

    seg_m, seg_f = blobs(3.0), blobs(0.0)
    mov = (seg_m[:, :1] + 0.5 * seg_m[:, 1:])
    fix = (seg_f[:, :1] + 0.5 * seg_f[:, 1:])
    model = build_model("xmorpher", embed_dim=16, num_heads=(1, 2, 4, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = soft_dice_loss(warp(seg_m, model(mov, fix).flow), seg_f)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = soft_dice_loss(warp(seg_m, model(mov, fix).flow), seg_f).item()
    assert final < losses[0] - 0.01, losses + [final]


def test_drop_path_trains_stochastically_and_evaluates_deterministically():
    model = build_model("xmorpher", embed_dim=16, num_heads=(1, 2, 4, 8), drop_path_rate=0.5)
    mov, fix = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(mov, fix).flow, model(mov, fix).flow)
        model.train()
        a, b = model(mov, fix).flow, model(mov, fix).flow
    assert not torch.equal(a, b)
