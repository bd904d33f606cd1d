"""Tests of mambamorph.nn.ssm: every selective-scan path against the sequential reference.

Forward output and the gradient of every input are compared in float32 with the relative error
||a - b|| / ||b|| < 1e-4, on odd lengths, B = 2, with and without z / D / delta_bias / softplus,
and at extreme step sizes (about 1e-4 and 10 after the softplus, and both mixed).
"""

import math

import pytest
import torch

import mambamorph.nn.ssm as ssm
import mambamorph.nn.ssm.cpu as ssm_cpu
import mambamorph.nn.ssm.cuda as ssm_cuda
import mambamorph.nn.ssm.torch_scan as ssm_torch
from mambamorph.errors import InputError
from mambamorph.nn.ssm import IMPLEMENTATIONS, resolve_impl, selective_scan
from mambamorph.nn.ssm.reference import selective_scan_reference

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a machine shared with other jobs PyTorch's
    spinning worker threads made single small ops up to 4000x slower (conv1d: 250 ms vs 0.06 ms).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(length, regime="normal", options="all", batch=2, channels=5, n_state=16, seed=0,
            dtype=torch.float32):
    """Random scan inputs. ``regime`` sets the step size after bias and softplus: "normal"
    (about 1e-3..1e-1), "tiny" (about 1e-4), "huge" (about 10), "mixed" (tiny or huge per step).
    ``options``: "all" (D, z, delta_bias, softplus), "none", or "bias_no_softplus"."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    softplus = options == "all"
    if regime == "normal":
        step = torch.exp(torch.empty(batch, channels, length, dtype=torch.float64)
                         .uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    elif regime == "tiny":
        step = 1e-4 * torch.exp(0.2 * randn(batch, channels, length))
    elif regime == "huge":
        step = 10.0 * torch.exp(0.05 * randn(batch, channels, length))
    elif regime == "mixed":
        pick = torch.rand(batch, channels, length, generator=g, dtype=torch.float64) < 0.5
        step = torch.where(pick, 1e-4, 10.0) * torch.exp(0.05 * randn(batch, channels, length))
    else:
        raise AssertionError(regime)
    bias = 0.1 * randn(channels)
    if softplus:  # delta such that softplus(delta + bias) == step
        delta = step + torch.log(-torch.expm1(-step)) - bias[:, None]
    elif options == "bias_no_softplus":
        delta = step - bias[:, None]
    else:
        delta = step
    a = -(torch.arange(1, n_state + 1, dtype=torch.float64)
          * torch.exp(0.3 * randn(channels, n_state)))  # (E, N), spread around -1..-16
    args = {
        "u": randn(batch, channels, length),
        "delta": delta,
        "A": a,
        "B": randn(batch, n_state, length),
        "C": randn(batch, n_state, length),
        "D": randn(channels) if options == "all" else None,
        "z": randn(batch, channels, length) if options in ("all", "bias_no_softplus") else None,
        "delta_bias": bias if options in ("all", "bias_no_softplus") else None,
    }
    args = {k: None if v is None else v.to(dtype) for k, v in args.items()}
    grad_out = randn(batch, channels, length).to(dtype)
    return args, softplus, grad_out


def _run(fn, args, softplus, grad_out, **kw):
    """Output and gradients of every tensor argument of ``fn`` for upstream gradient grad_out."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if v is not None}
    full = {k: leaves.get(k) for k in NAMES}
    y = fn(**full, delta_softplus=softplus, **kw)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out)
    return y.detach(), dict(zip(leaves.keys(), grads))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


_REFERENCE_CACHE = {}


def _reference(case):
    if case not in _REFERENCE_CACHE:
        args, softplus, grad_out = _inputs(*case)
        _REFERENCE_CACHE[case] = (args, softplus, grad_out,
                                  _run(selective_scan_reference, args, softplus, grad_out))
    return _REFERENCE_CACHE[case]


CASES = [  # (length, regime, options)
    (1, "normal", "all"),
    (37, "normal", "all"),
    (37, "normal", "bias_no_softplus"),
    (301, "normal", "none"),
    (1001, "normal", "all"),
    (301, "tiny", "all"),
    (301, "huge", "all"),
    (301, "mixed", "all"),
]


def _fast(impl):
    return {"cpu": ssm_cpu.selective_scan_cpu, "torch": ssm_torch.selective_scan_torch}[impl]


def _compare(impl, case, **kw):
    args, softplus, grad_out, (y_ref, g_ref) = _reference(case)
    y, g = _run(_fast(impl), args, softplus, grad_out, **kw)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    errors = {"out": _rel(y, y_ref)}
    errors.update({k: _rel(g[k], g_ref[k]) for k in g_ref})
    assert set(g) == set(g_ref)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{impl} {case}: relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_fast_paths_match_reference(impl, case):
    _compare(impl, case)


def test_cpu_path_many_chunks_regions_and_threads(monkeypatch):
    # 301 steps in chunks of 5 and regions of 3 chunks: every boundary case is crossed; and
    # every thread numba has works (small inputs run on one thread otherwise), so the
    # per-thread partial sums of dB and dC are exercised with 5 channels in uneven groups
    monkeypatch.setattr(ssm_cpu, "REGION_STEPS", 15)
    monkeypatch.setattr(ssm_cpu, "MIN_STEPS_PER_THREAD", 1)
    _compare("cpu", (301, "mixed", "all"), chunk=5)
    _compare("cpu", (37, "normal", "bias_no_softplus"), chunk=1)
    _compare("cpu", (1001, "normal", "all"))


def test_torch_path_small_chunks():
    _compare("torch", (301, "mixed", "all"), chunk=7)
    _compare("torch", (37, "normal", "bias_no_softplus"), chunk=1)


def test_dispatcher_matches_reference_on_cpu():
    args, softplus, _ = _inputs(37)
    y_ref = selective_scan(**args, delta_softplus=softplus, impl="reference")
    for impl in ("cpu", "torch", None):
        y = selective_scan(**args, delta_softplus=softplus, impl=impl)
        assert _rel(y, y_ref) < TOL


@pytest.mark.parametrize("fn", [selective_scan_reference, ssm_cpu.selective_scan_cpu,
                                ssm_torch.selective_scan_torch],
                         ids=["reference", "cpu", "torch"])
def test_gradcheck_float64(fn):
    args, softplus, _ = _inputs(6, batch=2, channels=3, n_state=3, dtype=torch.float64)
    names = [k for k, v in args.items() if v is not None]

    def f(*tensors):
        kw = dict(zip(names, tensors))
        if fn is ssm_torch.selective_scan_torch:
            kw["chunk"] = 4  # two chunks, so the carried state is differentiated too
        if fn is ssm_cpu.selective_scan_cpu:
            kw["chunk"] = 4
        return fn(**kw, delta_softplus=softplus)

    inputs = tuple(args[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reduced_precision_inputs_computed_in_float32():
    args, softplus, _ = _inputs(37)
    half = {k: None if v is None else v.to(torch.bfloat16) for k, v in args.items()}
    y_ref = selective_scan_reference(**half, delta_softplus=softplus)
    assert y_ref.dtype == torch.bfloat16
    # the float32 computation of the bfloat16-rounded inputs, rounded once at the end
    y32 = selective_scan_reference(**{k: None if v is None else v.float()
                                      for k, v in half.items()}, delta_softplus=softplus)
    assert torch.equal(y_ref, y32.to(torch.bfloat16))
    for impl in ("cpu", "torch"):
        y = selective_scan(**half, delta_softplus=softplus, impl=impl)
        assert y.dtype == torch.bfloat16
        assert _rel(y.float(), y32) < 1e-2  # one bfloat16 rounding of the output


def test_zero_length():
    args, softplus, _ = _inputs(0)
    for impl in ("reference", "cpu", "torch"):
        y = selective_scan(**args, delta_softplus=softplus, impl=impl)
        assert y.shape == (2, 5, 0)


# ------------------------------------------------------------------------------- dispatch
def test_resolve_impl_auto_and_env(monkeypatch):
    monkeypatch.delenv(ssm.ENV_VAR, raising=False)
    assert resolve_impl(None, "cpu") == "cpu"
    monkeypatch.setenv(ssm.ENV_VAR, "reference")
    assert resolve_impl(None, "cpu") == "reference"
    assert resolve_impl("torch", "cpu") == "torch"  # the argument beats the environment
    monkeypatch.setenv(ssm.ENV_VAR, "auto")
    assert resolve_impl(None, "cpu") == "cpu"
    monkeypatch.setenv(ssm.ENV_VAR, "fastest")
    with pytest.raises(InputError, match="MAMBAMORPH_SCAN"):
        resolve_impl(None, "cpu")
    with pytest.raises(InputError, match="impl must be one of"):
        resolve_impl("numba", "cpu")


def test_resolve_impl_on_cuda_devices(monkeypatch):
    monkeypatch.delenv(ssm.ENV_VAR, raising=False)
    monkeypatch.setattr(ssm_cuda, "_scan_fn", None)  # mamba_ssm absent
    assert resolve_impl(None, "cuda") == "torch"
    monkeypatch.setattr(ssm_cuda, "_scan_fn", lambda *a: None)  # mamba_ssm present
    assert resolve_impl(None, "cuda") == "cuda"
    assert resolve_impl(None, "cuda", torch.float64) == "torch"  # no float64 kernels
    assert resolve_impl(None, "cpu") == "cpu"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS[:3])
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_dispatch_calls_the_chosen_implementation(monkeypatch, impl, how):
    calls = []

    def spy(name):
        def fn(*args, **kwargs):
            calls.append(name)
            return args[0]
        return fn

    monkeypatch.setattr(ssm, "selective_scan_reference", spy("reference"))
    monkeypatch.setattr(ssm_cpu, "selective_scan_cpu", spy("cpu"))
    monkeypatch.setattr(ssm_torch, "selective_scan_torch", spy("torch"))
    args, softplus, _ = _inputs(5)
    if how == "environment":
        monkeypatch.setenv(ssm.ENV_VAR, impl)
        selective_scan(**args, delta_softplus=softplus)
    else:
        monkeypatch.setenv(ssm.ENV_VAR, "reference" if impl != "reference" else "cpu")
        selective_scan(**args, delta_softplus=softplus, impl=impl)
    assert calls == [impl]


def test_cuda_impl_without_mamba_ssm_names_the_install(monkeypatch):
    monkeypatch.setattr(ssm_cuda, "_scan_fn", None)
    args, softplus, _ = _inputs(5)
    with pytest.raises(RuntimeError, match=r'pip install "mambamorph\[cuda\]"'):
        selective_scan(**args, delta_softplus=softplus, impl="cuda")


def test_bad_shapes_raise_input_error():
    args, softplus, _ = _inputs(7)
    bad = [("B", args["B"][:, :, :-1], "expected B"),
           ("A", args["A"][:-1], "expected A"),
           ("delta", args["delta"][:1], "expected delta"),
           ("D", torch.ones(3), "expected D"),
           ("z", args["z"][..., :3], "expected z"),
           ("u", args["u"][0], "expected u"),
           ("C", args["C"].long(), "floating-point")]
    for name, value, message in bad:
        with pytest.raises(InputError, match=message):
            selective_scan(**{**args, name: value}, delta_softplus=softplus)


def test_cpu_impl_rejects_other_devices():
    args, softplus, _ = _inputs(5)
    args["u"] = args["u"].to("meta")
    with pytest.raises(ValueError, match="on the CPU"):
        ssm_cpu.selective_scan_cpu(**args, delta_softplus=softplus)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "torch"])
def test_gpu_paths_match_reference(impl):
    if impl == "cuda" and ssm_cuda.mamba_ssm_scan_fn() is None:
        pytest.skip("mamba_ssm is not installed")
    for case in [(37, "normal", "all"), (301, "mixed", "all"), (301, "normal", "none")]:
        args, softplus, grad_out, (y_ref, g_ref) = _reference(case)
        dev = {k: None if v is None else v.cuda() for k, v in args.items()}
        y, g = _run(lambda **kw: selective_scan(**kw, impl=impl), dev, softplus,
                    grad_out.cuda())
        assert _rel(y.cpu(), y_ref) < TOL
        for k in g_ref:
            assert _rel(g[k].cpu(), g_ref[k]) < TOL, k
