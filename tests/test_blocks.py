"""Shared layers: position code, token reshapes, patch merging, decoder, U-Nets (nn/blocks.py,
nn/features.py). Small tensors only; the Mamba / Swin stages are replaced by simple token mixers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambamorph.errors import InputError
from mambamorph.nn.blocks import (ConvINAct, ConvSkipBranch, ConvUNet, DecoderBlock, FlowHead,
                                  RegistrationUNet, check_pair)
from mambamorph.nn.tokens import (PatchEmbed, PatchMerging, sinusoidal_position_code,
                                  tokens_to_volume, volume_to_tokens)
from mambamorph.nn.features import FeatureExtractor, ReadoutHead


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class LinearMixer(nn.Module):
    """A token stage for tests: a per-token linear map that records the grids it sees."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.grids: list[tuple[int, int, int]] = []

    def forward(self, x, grid):
        self.grids.append(tuple(grid))
        assert x.shape[1] == math.prod(grid)
        return self.lin(x)


# ---------------------------------------------------------------------------------------------
# position code
# ---------------------------------------------------------------------------------------------
def test_position_code_matches_the_formula():
    grid = (3, 4, 5)
    code = sinusoidal_position_code(grid, 96)
    assert code.shape == (96, 3, 4, 5)
    k = torch.arange(16, dtype=torch.float64)
    freq = 10000.0 ** (-k / 16)
    for axis in range(3):
        for idx in [(0, 0, 0), (2, 3, 4), (1, 2, 3)]:
            pos = idx[axis]
            expect = torch.cat([(pos * freq).sin(), (pos * freq).cos()]).float()
            got = code[32 * axis:32 * (axis + 1), idx[0], idx[1], idx[2]]
            torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)
    # hand values: axis-1 first sine at g1 = 1 is sin(1); first cosine of axis 2 at g2 = 0 is 1
    assert code[32, 0, 1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert code[80, 2, 3, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_position_code_other_widths_and_cache():
    code = sinusoidal_position_code((2, 2, 2), 24)  # 8 channels per axis, frequencies 10000^(-k/4)
    assert code.shape == (24, 2, 2, 2)
    assert code[1, 1, 0, 0].item() == pytest.approx(math.sin(10000.0 ** -0.25), abs=1e-6)
    assert code[20, 0, 0, 1].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    odd = sinusoidal_position_code((2, 2, 2), 20)  # cut from 3 x 8 = 24 channels
    torch.testing.assert_close(odd, code[:20])
    assert sinusoidal_position_code((3, 4, 5), 96) is sinusoidal_position_code((3, 4, 5), 96)
    with pytest.raises(InputError):
        sinusoidal_position_code((2, 2), 96)
    with pytest.raises(InputError):
        sinusoidal_position_code((2, 2, 2), 0)


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------
def test_tokens_are_in_raster_order_and_round_trip():
    vol = torch.randn(2, 5, 3, 4, 6)
    tokens, grid = volume_to_tokens(vol)
    assert grid == (3, 4, 6) and tokens.shape == (2, 72, 5)
    g = (2, 1, 5)
    torch.testing.assert_close(tokens[:, g[0] * 24 + g[1] * 6 + g[2]], vol[:, :, g[0], g[1], g[2]])
    torch.testing.assert_close(tokens_to_volume(tokens, grid), vol)
    with pytest.raises(InputError):
        tokens_to_volume(tokens, (3, 4, 5))


def test_patch_merging_gathers_the_eight_offsets_in_order():
    grid = (4, 2, 6)
    c = 3
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), dim=-1)
    # token features: its grid index (3 values) -> the merged vector shows where each part came from
    x = idx.reshape(1, -1, c).float()
    merge = PatchMerging(c)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
        merge.norm.bias.zero_()
    gathered = {}
    merge.norm.register_forward_hook(lambda m, inp, out: gathered.setdefault("x", inp[0]))
    out, new_grid = merge(x, grid)
    assert new_grid == (2, 1, 3) and out.shape == (1, 6, 2 * c)
    v = gathered["x"].view(*new_grid, 8, c)
    offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1),
               (1, 1, 1)]
    for a in range(2):
        for b in range(1):
            for e in range(3):
                for k, off in enumerate(offsets):
                    expect = torch.tensor([2 * a + off[0], 2 * b + off[1], 2 * e + off[2]],
                                          dtype=torch.float32)
                    torch.testing.assert_close(v[a, b, e, k], expect)
    assert n_params(PatchMerging(96)) == 8 * 96 * 2 + 8 * 96 * 192
    with pytest.raises(InputError):
        merge(torch.randn(1, 3 * 2 * 2, c), (3, 2, 2))


def _merge_reference(x, grid, weight, bias, norm):
    """Patch merging with the norm after, written out block by block: the 2x2x2 block's values
    (zeros beyond an odd grid) times ``weight (out, C, 2, 2, 2)`` plus ``bias``, then the
    LayerNorm ``norm``; tokens ``(B, L, C)`` -> ``(B, L', out)`` in raster order."""
    b, _, c = x.shape
    v = x.view(b, *grid, c)
    new_grid = tuple((g + 1) // 2 for g in grid)
    out = []
    for i in range(new_grid[0]):
        for j in range(new_grid[1]):
            for k in range(new_grid[2]):
                block = torch.zeros(b, 2, 2, 2, c, dtype=x.dtype)
                part = v[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 2 * k:2 * k + 2]
                block[:, :part.shape[1], :part.shape[2], :part.shape[3]] = part
                out.append(torch.einsum("bpqrc,ocpqr->bo", block, weight) + bias)
    y = torch.stack(out, dim=1)  # (B, L', out)
    return F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps), new_grid


@pytest.mark.parametrize("grid", [(4, 2, 6), (3, 5, 2), (1, 1, 1)])
def test_patch_merging_norm_after_matches_the_block_formula(grid):
    """XMorpher's layout: a linear map of each 2x2x2 block (as a strided conv), then the norm;
    odd grids are zero-padded with ``pad_odd``. Forward and gradients against the reference."""
    torch.manual_seed(0)
    c = 4
    merge = PatchMerging(c, norm="after", pad_odd=True).double()
    with torch.no_grad():
        merge.norm.weight.uniform_(0.5, 1.5)
        merge.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, math.prod(grid), c, dtype=torch.float64, requires_grad=True)
    out, new_grid = merge(x, grid)
    ref, ref_grid = _merge_reference(x, grid, merge.reduction.weight, merge.reduction.bias,
                                     merge.norm)
    assert new_grid == ref_grid and out.shape == (2, math.prod(new_grid), 2 * c)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), [x, *merge.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *merge.parameters()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_patch_merging_options():
    # parameters: 8 C out + 3 out (conv weight and bias, norm after) vs 16 C + 8 C out (Swin)
    assert n_params(PatchMerging(48, norm="after")) == 8 * 48 * 96 + 3 * 96
    assert n_params(PatchMerging(48)) == 16 * 48 + 8 * 48 * 96
    assert n_params(PatchMerging(48, 64, norm="after")) == 8 * 48 * 64 + 3 * 64
    # pad_odd in the Swin layout: the same as merging the grid padded with zero tokens
    torch.manual_seed(1)
    merge = PatchMerging(3, pad_odd=True)
    x = torch.randn(1, 3 * 2 * 5, 3)
    padded = F.pad(x.view(1, 3, 2, 5, 3), (0, 0, 0, 1, 0, 0, 0, 1)).reshape(1, -1, 3)
    out, grid = merge(x, (3, 2, 5))
    ref, ref_grid = merge(padded, (4, 2, 6))
    assert grid == ref_grid == (2, 1, 3)
    torch.testing.assert_close(out, ref)
    with pytest.raises(InputError, match="norm"):
        PatchMerging(3, norm="middle")
    with pytest.raises(InputError, match="even token grid"):
        PatchMerging(3, norm="after")(torch.randn(1, 3 * 2 * 2, 3), (3, 2, 2))


def test_patch_embed_shapes_and_position_code():
    torch.manual_seed(1)
    emb = PatchEmbed(2, 24, 4, position_code=True)
    plain = PatchEmbed(2, 24, 4, position_code=False)
    plain.load_state_dict(emb.state_dict())
    x = torch.randn(2, 2, 8, 12, 16)
    tokens, grid = emb(x)
    assert grid == (2, 3, 4) and tokens.shape == (2, 24, 24)
    base, _ = plain(x)
    code = sinusoidal_position_code(grid, 24).flatten(1).t()
    torch.testing.assert_close(tokens - base, code.expand(2, -1, -1))
    assert n_params(PatchEmbed(2, 96)) == 2 * 96 * 64 + 96 + 192
    assert list(emb.state_dict()) == ["proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    with pytest.raises(InputError):
        emb(torch.randn(1, 2, 8, 10, 8))


# ---------------------------------------------------------------------------------------------
# conv blocks, decoder, head
# ---------------------------------------------------------------------------------------------
def test_conv_blocks_decoder_and_head():
    assert n_params(ConvINAct(64, 16)) == 64 * 16 * 27  # no bias, no affine
    skip = ConvSkipBranch(2, 16, 48)
    f_full, f_half = skip(torch.randn(1, 2, 8, 12, 16))
    assert f_full.shape == (1, 16, 8, 12, 16) and f_half.shape == (1, 48, 4, 6, 8)
    up = DecoderBlock(32, 16, 8)
    assert n_params(up) == 40 * 16 * 27 + 16 * 16 * 27
    y = up(torch.randn(1, 32, 2, 3, 4), torch.randn(1, 8, 4, 6, 8))
    assert y.shape == (1, 16, 4, 6, 8)
    with pytest.raises(InputError):
        up(torch.randn(1, 32, 2, 3, 4))
    with pytest.raises(InputError):
        up(torch.randn(1, 32, 2, 3, 4), torch.randn(1, 7, 4, 6, 8))
    assert DecoderBlock(8, 4)(torch.randn(1, 8, 2, 2, 2)).shape == (1, 4, 4, 4, 4)
    head = FlowHead(16, 3)
    assert n_params(head) == 16 * 3 * 27 + 3
    assert torch.all(head.bias == 0) and 0 < head.weight.std().item() < 3e-5


# ---------------------------------------------------------------------------------------------
# the token U-Net backbone
# ---------------------------------------------------------------------------------------------
def test_registration_unet_counts_shapes_and_grids():
    dims = (96, 192, 384)
    stages = [LinearMixer(d) for d in dims]
    net = RegistrationUNet(2, stages)
    # the reference module minus its three Mamba blocks (68,160 + 251,520 + 963,840) and their
    # three pre-norms; here the stages are Linear(d, d) instead
    mamba = 68160 + 251520 + 963840 + 2 * (96 + 192 + 384)
    linear = sum(d * d + d for d in dims)
    assert n_params(net) - linear + mamba == 7_305_459
    x = torch.randn(1, 2, 32, 48, 64)
    y = net(x)
    assert y.shape == (1, 3, 32, 48, 64) and torch.isfinite(y).all()
    assert [s.grids for s in stages] == [[(8, 12, 16)], [(4, 6, 8)], [(2, 3, 4)]]
    outs = net.encode(x)
    assert [tuple(o.shape) for o in outs] == [(1, 96, 8, 12, 16), (1, 192, 4, 6, 8),
                                              (1, 384, 2, 3, 4)]
    assert net.size_multiple == 16
    with pytest.raises(InputError):
        net(torch.randn(1, 2, 32, 40, 32))
    with pytest.raises(InputError):
        net(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(InputError):
        RegistrationUNet(2, [])


def test_registration_unet_checkpointing_is_exact():
    torch.manual_seed(2)
    net = RegistrationUNet(2, [LinearMixer(8), LinearMixer(16)], embed_dim=8, head_channels=4)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
    ref = RegistrationUNet(2, [LinearMixer(8), LinearMixer(16)], embed_dim=8, head_channels=4,
                           checkpoint=True)
    ref.load_state_dict(net.state_dict())
    x = torch.randn(1, 2, 16, 8, 24)
    w = torch.randn(1, 3, 16, 8, 24)
    outs, grads = [], []
    for m in (net, ref):
        m.train()
        y = m(x)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# the VoxelMorph U-Net and the feature extractor
# ---------------------------------------------------------------------------------------------
def test_conv_unet_counts_and_shapes():
    # reference builds (voxelmorph Unet): without the flow head's 1,299 parameters
    assert n_params(ConvUNet(2, [16] * 4, [16] * 6)) == 92_179 - 1299
    assert n_params(ConvUNet(2, [16, 32, 32, 32], [32] * 5 + [16, 16])) == 327_331 - 1299
    assert n_params(ConvUNet(32, [16] * 4, [16] * 6)) == 154_051 - 48_912 - 1299
    net = ConvUNet(2, [16] * 4, [16] * 6)
    assert net(torch.randn(1, 2, 16, 32, 48)).shape == (1, 16, 16, 32, 48)
    half = ConvUNet(2, [16] * 4, [16] * 6, half_res=True)
    assert half(torch.randn(1, 2, 16, 32, 48)).shape == (1, 16, 8, 16, 24)
    with pytest.raises(InputError):
        net(torch.randn(1, 2, 16, 24, 16))
    with pytest.raises(InputError):
        ConvUNet(2, [16] * 4, [16] * 3)


def test_feature_extractor_and_readout():
    fe = FeatureExtractor(1, 16)
    assert n_params(fe) == 48_912
    assert n_params(ReadoutHead(16)) == 4_115
    a, b = torch.randn(2, 1, 8, 12, 16), torch.randn(2, 1, 8, 12, 16)
    pair = fe.pair(a, b)
    assert pair.shape == (2, 32, 8, 12, 16)
    torch.testing.assert_close(pair, torch.cat([fe(a), fe(b)], dim=1), atol=1e-5, rtol=1e-5)
    assert ReadoutHead(16)(fe(a)).shape == (2, 3, 4, 6, 8)


def test_check_pair():
    a = torch.zeros(1, 1, 16, 32, 48)
    check_pair(a, a.clone(), 1, 16, "m")
    for bad in (torch.zeros(1, 1, 16, 32, 32), torch.zeros(1, 2, 16, 32, 48),
                torch.zeros(1, 1, 16, 32, 48, dtype=torch.long)):
        with pytest.raises(InputError):
            check_pair(a, bad, 1, 16, "m")
    with pytest.raises(InputError):
        check_pair(torch.zeros(1, 1, 16, 24, 16), torch.zeros(1, 1, 16, 24, 16), 1, 16, "m")


def test_box_pool_is_torch_average_pooling():
    """BoxPool3d (a depthwise convolution) = AvgPool3d(3, 2, 1) with padding counted, values and
    gradients, odd and even sizes, channels-last too."""
    from mambamorph.nn.blocks import BoxPool3d

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 12, 7, dtype=torch.float64, generator=g, requires_grad=True)
    ref = torch.nn.AvgPool3d(3, stride=2, padding=1)(x)
    out = BoxPool3d()(x)
    assert out.shape == ref.shape == (2, 3, 5, 6, 4)
    assert torch.allclose(out, ref, atol=1e-14)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(gx, gr, atol=1e-13)
    xl = x.detach().float().contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(BoxPool3d()(xl), ref.detach().float(), atol=1e-6)


def test_instance_norm_keeps_channels_last_and_matches_torch():
    """The block's InstanceNorm3d on a channels-last input = torch's instance norm (values and
    gradients), and stays channels-last; other inputs take torch's own path."""
    from mambamorph.nn.blocks import InstanceNorm3d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 8, dtype=torch.float64, generator=g) * 3 + 1
    xl = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    norm = InstanceNorm3d(5)
    out = norm(xl)
    ref = F.instance_norm(x, eps=norm.eps)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(out, ref, atol=1e-12)
    (gx,) = torch.autograd.grad((out * torch.arange(out.numel(), dtype=out.dtype)
                                 .view(out.shape)).sum(), xl)
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad((F.instance_norm(xr, eps=norm.eps) * torch.arange(
        out.numel(), dtype=out.dtype).view(out.shape)).sum(), xr)
    assert torch.allclose(gx, gr, atol=1e-9)
    assert torch.allclose(norm(x), ref, atol=1e-12)  # contiguous input: torch's path
    assert torch.allclose(norm(xl[:1]), ref[:1], atol=1e-12)  # batch of one
    assert not dict(norm.state_dict())


def test_decoder_block_in_a_channels_last_model_matches_contiguous():
    """A channels-last DecoderBlock (as ``predict`` runs on the CPU) given contiguous inputs: the
    same output as the contiguous block."""
    torch.manual_seed(0)
    block = DecoderBlock(6, 4, 3).double().eval()
    x = torch.randn(1, 6, 3, 4, 5, dtype=torch.float64)
    skip = torch.randn(1, 3, 6, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x, skip)
        block.to(memory_format=torch.channels_last_3d)
        out = block(x, skip)
        out32 = block.float()(x.float(), skip.float())
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(out32.double(), ref, atol=1e-4)
