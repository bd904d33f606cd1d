"""Tests of mambamorph.nn.mamba: the Mamba-1 block (SPEC.md section 1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambamorph.errors import InputError
from mambamorph.nn.mamba import Mamba, mamba_parameter_count


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a machine shared with other jobs PyTorch's
    spinning worker threads made single small ops up to 4000x slower (conv1d: 250 ms vs 0.06 ms).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("width, expected", [(96, 68_160), (192, 251_520), (384, 963_840)])
def test_parameter_counts_match_spec(width, expected):
    r = math.ceil(width / 16)
    assert 6 * width**2 + 4 * width * r + 110 * width == expected
    assert _count(Mamba(width)) == expected
    assert mamba_parameter_count(width) == expected
    # the reverse branch adds conv, x_proj, dt_proj, A_log and D once more: 4 D R + 110 D
    assert _count(Mamba(width, bidirectional=True)) == expected + 4 * width * r + 110 * width
    assert mamba_parameter_count(width, bidirectional=True) == _count(
        Mamba(width, bidirectional=True))


def test_layer_shapes_and_names():
    m = Mamba(32)
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (128, 32),
        "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
        "x_proj.weight": (2 + 32, 64),
        "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
        "A_log": (64, 16), "D": (64,),
        "out_proj.weight": (32, 64),
    }


def test_initialisation():
    torch.manual_seed(1)
    m = Mamba(48, dt_min=1e-3, dt_max=1e-1, bidirectional=True)
    for a_log, d, dt_proj in ((m.A_log, m.D, m.dt_proj), (m.A_b_log, m.D_b, m.dt_proj_b)):
        assert a_log.dtype == torch.float32
        assert torch.allclose(a_log, torch.log(torch.arange(1, 17.0)).expand(96, 16))
        assert torch.equal(d, torch.ones(96))
        assert a_log._no_weight_decay and d._no_weight_decay
        bound = 3 ** -0.5  # R = ceil(48 / 16) = 3
        assert dt_proj.weight.abs().max() <= bound
        assert dt_proj.weight.abs().max() > 0.8 * bound  # uniform over the whole range
        step = F.softplus(dt_proj.bias)
        assert step.min() >= 1e-3 * (1 - 1e-5) and step.max() <= 1e-1 * (1 + 1e-5)
        # log-uniform: the median of log(step) lies near the middle of the range
        mid = 0.5 * (math.log(1e-3) + math.log(1e-1))
        assert abs(torch.log(step).median().item() - mid) < 0.6


def test_dt_floor_applies():
    torch.manual_seed(0)
    m = Mamba(16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(m.dt_proj.bias), torch.full((32,), 1e-4), rtol=1e-3)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_scan_implementations_agree_in_the_block(bidirectional):
    torch.manual_seed(0)
    m = Mamba(16, bidirectional=bidirectional)
    x = torch.randn(2, 45, 16)
    grad_out = torch.randn(2, 45, 16)
    results = {}
    for impl in ("reference", "cpu", "torch"):
        m.scan_impl = impl
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(grad_out)
        results[impl] = (y.detach(), xi.grad, {k: p.grad.clone() for k, p in m.named_parameters()})
    y0, gx0, gp0 = results["reference"]
    for impl in ("cpu", "torch"):
        y, gx, gp = results[impl]
        assert (y - y0).norm() / y0.norm() < 1e-5
        assert (gx - gx0).norm() / gx0.norm() < 1e-4
        for k in gp0:
            assert (gp[k] - gp0[k]).norm() / gp0[k].norm() < 1e-4, (impl, k)


def test_block_accepts_float64_odd_length_and_batch():
    torch.manual_seed(0)
    m = Mamba(8).double()
    x = torch.randn(3, 13, 8, dtype=torch.float64, requires_grad=True)
    for impl in ("reference", "cpu", "torch"):
        m.scan_impl = impl
        y = m(x)
        assert y.shape == (3, 13, 8) and y.dtype == torch.float64
        assert torch.isfinite(y).all()
    m.scan_impl = "cpu"
    xs = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (xs,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_block_is_causal_and_bidirectional_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 30, 16)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, 16)
    uni = Mamba(16, scan_impl="cpu")
    with torch.no_grad():
        a, b = uni(x), uni(x2)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])
    bi = Mamba(16, bidirectional=True, scan_impl="cpu")
    with torch.no_grad():
        a, b = bi(x), bi(x2)
    assert not torch.allclose(a[:, :20], b[:, :20])


def test_bidirectional_is_symmetric_under_reversal():
    # swapping the forward and reverse branches and reversing the input reverses the output
    torch.manual_seed(0)
    m = Mamba(16, bidirectional=True, scan_impl="cpu")
    swapped = Mamba(16, bidirectional=True, scan_impl="cpu")
    sd = m.state_dict()
    pairs = [("conv1d", "conv1d_b"), ("x_proj", "x_proj_b"), ("dt_proj", "dt_proj_b"),
             ("A_log", "A_b_log"), ("D", "D_b")]
    new = dict(sd)
    for f, b in pairs:
        for k in sd:
            if k == f or k.startswith(f + "."):
                kb = b + k[len(f):]
                new[k], new[kb] = sd[kb], sd[k]
    swapped.load_state_dict(new)
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        assert torch.allclose(m(x.flip(1)), swapped(x).flip(1), atol=1e-6)


def test_bad_input_and_arguments_raise():
    m = Mamba(8)
    with pytest.raises(InputError, match=r"expected input \(B, L, 8\)"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(InputError, match=r"expected input"):
        m(torch.randn(5, 8))
    with pytest.raises(InputError, match="dt_rank"):
        Mamba(8, dt_rank="big")
    with pytest.raises(InputError, match="d_state"):
        Mamba(8, d_state=0)
    with pytest.raises(InputError, match="dt_min"):
        Mamba(8, dt_min=0.2, dt_max=0.1)
