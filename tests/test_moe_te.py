"""moe_ffn's Transformer Engine lane (``backend="te"``, ``megatron_ext/ops/moe/te_grouped.py``).

TE is not installable on the CPU lane, so the glue (operand order, layouts, group splits, the
three ``general_grouped_gemm`` signatures, gradients, the logged first-call fallback) runs here
against a stand-in of TE's grouped GEMM written from TE's contract: one GEMM per group,
``out_i = op_b(B_i) @ op_a(A_i)`` with the layout's letters transposing A and B, contiguous
operands (TE passes raw pointers), a zero block for an empty group, and the caller's output
split by ``m_splits`` rows under ``single_output``. ``test_standin_follows_te_grouped_linear``
pins the stand-in to the way TE's own ``GroupedLinear`` uses the call. The ``gpu`` test runs the
lane on the real TE where one is installed (skipped otherwise).
"""

import importlib.machinery
import os
import sys
import types

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops import moe  # noqa: E402
from megatron_ext.ops.moe import te_grouped  # noqa: E402


def _real_te() -> bool:
    import importlib.util

    return "transformer_engine" not in sys.modules and \
        importlib.util.find_spec("transformer_engine") is not None


# ----------------------------------------------------------------------------- the stand-in

def _te_contract(A, B, out, layout, m_splits, single_output):
    assert layout in ("TN", "NN", "NT"), layout
    n = len(A)
    assert len(B) == n, (len(A), len(B))
    for t in (*A, *B, *out):
        assert t.is_contiguous(), "TE hands raw pointers to cuBLAS: operands must be contiguous"
    if single_output:
        assert len(out) == 1 and m_splits is not None and len(m_splits) == n
        assert out[0].shape[0] == sum(m_splits), (out[0].shape, m_splits)
        views = out[0].split(list(m_splits))
    else:
        assert len(out) == n
        views = out
    for a, b, o in zip(A, B, views):
        a2 = a.t() if layout[0] == "T" else a
        b2 = b.t() if layout[1] == "T" else b
        assert b2.shape[1] == a2.shape[0], ("inner dims", layout, tuple(a.shape), tuple(b.shape))
        assert tuple(o.shape) == (b2.shape[0], a2.shape[1]), ("out shape", tuple(o.shape))
        if a.numel() == 0 or b.numel() == 0:
            o.zero_()
        else:
            o.copy_(b2 @ a2)


def _plain_call(A, B, out, layout, m_splits, single_output, accumulate, gelu, use_bias):
    """What each signature below does once its release's own arguments are checked: the lane asks
    for plain GEMMs (no accumulation, GELU or bias)."""
    assert not accumulate and not gelu and not use_bias
    _te_contract(A, B, out, layout, m_splits, single_output)
    return out, None, None


def _signature_2_1(A, B, out, out_dtype, workspaces, layout="TN", m_splits=None, gelu=False,
                   grad=False, accumulate=False, bias=None, use_bias=False,
                   use_split_accumulator=False, D_dtype=None, single_output=False):
    assert isinstance(workspaces, list) and all(isinstance(w, torch.Tensor) for w in workspaces)
    return _plain_call(A, B, out, layout, m_splits, single_output, accumulate, gelu, use_bias)


def _signature_2_10(A, B, out, out_dtype, layout="TN", m_splits=None, gelu=False, grad=False,
                    accumulate=False, bias=None, use_bias=False, use_split_accumulator=False,
                    D_dtype=None, single_output=False):
    return _plain_call(A, B, out, layout, m_splits, single_output, accumulate, gelu, use_bias)


def _signature_2_11(A, B, out, quantization_params, out_dtype, layout="TN", m_splits=None,
                    gelu=False, grad=False, accumulate=False, bias=None, use_bias=False,
                    use_split_accumulator=False, D_dtype=None, single_output=False):
    assert quantization_params == [None] * len(A), quantization_params
    return _plain_call(A, B, out, layout, m_splits, single_output, accumulate, gelu, use_bias)


SIGNATURES = {"2.1": _signature_2_1, "2.10": _signature_2_10, "2.11": _signature_2_11}


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


@pytest.fixture
def install_te(monkeypatch):
    """``install_te(fn, workspaces=True)``: a stand-in TE whose grouped GEMM is ``fn``."""
    def install(fn=None, workspaces=True):
        mods = {"transformer_engine": _module("transformer_engine"),
                "transformer_engine.pytorch": _module("transformer_engine.pytorch"),
                "transformer_engine.pytorch.cpp_extensions": _module(
                    "transformer_engine.pytorch.cpp_extensions",
                    **({} if fn is None else {"general_grouped_gemm": fn})),
                "transformer_engine.pytorch.module": _module("transformer_engine.pytorch.module"),
                "transformer_engine.pytorch.module.base": _module(
                    "transformer_engine.pytorch.module.base",
                    **({"get_multi_stream_cublas_workspace": lambda: [torch.empty(16, dtype=torch.uint8)]}
                       if workspaces else {}))}
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        te_grouped._grouped_gemm.cache_clear()

    yield install
    te_grouped._grouped_gemm.cache_clear()
    moe._TE_RAN.clear()


@pytest.fixture(autouse=True)
def _clean_records():
    backends.reset()
    yield
    backends.reset()


def test_standin_follows_te_grouped_linear():
    """TE's GroupedLinear (``y_i = x_i W_i^T``, W_i [out, in]) calls the grouped GEMM with
    (A=weights, B=inputs, "TN") forward, (A=weights, B=grad, "NN") for the data gradient and
    (A=inputs, B=grad, "NT") for the weight gradient; the stand-in gives those products."""
    g = torch.Generator().manual_seed(0)
    m, n_in, n_out = [3, 0, 5], 6, 4
    W = [torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in m]
    x = torch.randn(sum(m), n_in, generator=g, dtype=torch.float64)
    dy = torch.randn(sum(m), n_out, generator=g, dtype=torch.float64)
    xs, dys = x.split(m), dy.split(m)
    y = torch.empty(sum(m), n_out, dtype=torch.float64)
    _te_contract(W, xs, [y], "TN", m, True)
    dx = torch.empty_like(x)
    _te_contract(W, dys, [dx], "NN", m, True)
    dW = [torch.full_like(w, 7.0) for w in W]
    _te_contract(xs, dys, dW, "NT", m, False)
    for i, (xi, dyi) in enumerate(zip(xs, dys)):
        r = slice(sum(m[:i]), sum(m[:i + 1]))
        assert torch.equal(y[r], xi @ W[i].t())
        assert torch.equal(dx[r], dyi @ W[i])
        assert torch.equal(dW[i], dyi.t() @ xi)
    assert torch.count_nonzero(dW[1]) == 0   # the empty group's block is zeroed


# ----------------------------------------------------------------------------- the lane vs the spec

def _case(name, activation, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    H, Fd = 12, 10
    T, E, k = {"random": (33, 6, 2), "k1": (21, 5, 1), "k8": (17, 8, 8),
               "empty_experts": (19, 7, 2), "one_expert": (23, 4, 1)}[name]
    if name == "empty_experts":   # experts 0 and 5 only
        idx = torch.stack([torch.zeros(T, dtype=torch.int64), torch.full((T,), 5)], 1)
    elif name == "one_expert":
        idx = torch.full((T, 1), 2, dtype=torch.int64)
    else:
        idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    n1 = 2 * Fd if activation in ("swiglu", "geglu") else Fd
    x = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    probs = torch.rand(T, idx.shape[1], generator=g, dtype=torch.float64).to(dtype)
    w1 = (torch.randn(E, H, n1, generator=g, dtype=torch.float64) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, Fd, H, generator=g, dtype=torch.float64) * Fd ** -0.5).to(dtype)
    return x, probs, idx, w1, w2


def _grads(fn, x, probs, idx, w1, w2, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, probs, w1, w2)]
    out = fn(leaves[0], leaves[1], idx, leaves[2], leaves[3])
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("signature", list(SIGNATURES))
@pytest.mark.parametrize("name", ["random", "k1", "k8", "empty_experts", "one_expert"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_te_lane_matches_the_reference(install_te, signature, name, activation):
    """fp64 through the stand-in against the torch reference (the spec) in fp64: output and the
    gradients of x, probs, w1, w2; then fp32 against the fp64 reference."""
    install_te(SIGNATURES[signature])
    x, probs, idx, w1, w2 = _case(name, activation, torch.float64, seed=len(name))
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def ref(*a):
        return moe.moe_ffn_reference(*a, activation)

    def te(*a):
        return te_grouped.te_moe_ffn(*a, activation)

    y_ref, g_ref = _grads(ref, x, probs, idx, w1, w2, dout)
    y_te, g_te = _grads(te, x, probs, idx, w1, w2, dout)
    torch.testing.assert_close(y_te, y_ref, rtol=1e-12, atol=1e-12)
    for what, a, b in zip(("dx", "dprobs", "dw1", "dw2"), g_te, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")

    f32 = [t.float() for t in (x, probs)] + [idx] + [t.float() for t in (w1, w2)]
    y32, g32 = _grads(te, *f32, dout.float())
    torch.testing.assert_close(y32.double(), y_ref, rtol=1e-4, atol=1e-5)
    for what, a, b in zip(("dx", "dprobs", "dw1", "dw2"), g32, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_grouped_linear_rejects_splits_that_do_not_cover_the_rows(install_te):
    install_te(_signature_2_11)
    x, w = torch.randn(5, 3), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"m_splits \(sum 4, 2 groups\)"):
        te_grouped.te_grouped_linear(x, w, [1, 3])
    with pytest.raises(ValueError, match=r"3 groups"):
        te_grouped.te_grouped_linear(x, w, [1, 3, 1])


# ----------------------------------------------------------------------------- detection and fallback

@pytest.mark.skipif(_real_te(), reason="a real Transformer Engine is installed")
def test_without_te_the_lane_says_so():
    te_grouped._grouped_gemm.cache_clear()
    assert te_grouped.unavailable() == "transformer_engine is not installed"
    x, probs, idx, w1, w2 = _case("random", "swiglu", torch.float32, 0)
    with pytest.raises(backends.BackendUnavailable, match="transformer_engine is not installed"):
        moe.moe_ffn(x, probs, idx, w1, w2, "swiglu", backend="te")
    moe.moe_ffn(x, probs, idx, w1, w2, "swiglu", backend="auto")
    (rec,) = [r for r in backends.records() if r["op"] == "moe_ffn"]
    assert rec["observed"] == "torch" and "te: transformer_engine is not installed" in rec["reason"]


def test_unknown_te_releases_are_named(install_te):
    install_te(None)
    assert "has no general_grouped_gemm" in te_grouped.unavailable()

    def old_style(A, B, out, out_dtype, workspaces, layout="TN"):
        raise AssertionError("never called")

    install_te(old_style)
    assert "lacks ['m_splits', 'grad', 'single_output']" in te_grouped.unavailable()
    install_te(_signature_2_1, workspaces=False)
    assert "no get_multi_stream_cublas_workspace" in te_grouped.unavailable()
    install_te(_signature_2_11)
    assert te_grouped.unavailable() is None


def test_te_needs_cuda_tensors(install_te):
    install_te(_signature_2_11)
    x, probs, idx, w1, w2 = _case("random", "swiglu", torch.float32, 1)
    with pytest.raises(backends.BackendUnavailable, match=r"backend='te'.*runs on CUDA tensors"):
        moe.moe_ffn(x, probs, idx, w1, w2, "swiglu", backend="te")


def test_a_failing_te_is_logged_once_and_skipped(install_te, caplog):
    """The first call per (device, dtype) is guarded: an error inside TE under "auto" is a
    recorded, logged fallback to the torch reference and TE is skipped from then on; asked for by
    name it is an error; after a first call that ran, errors are not swallowed."""
    calls = []

    def broken(A, B, out, quantization_params, out_dtype, layout="TN", m_splits=None, gelu=False,
               grad=False, accumulate=False, bias=None, use_bias=False,
               use_split_accumulator=False, D_dtype=None, single_output=False):
        calls.append(layout)
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    install_te(broken)
    x, probs, idx, w1, w2 = _case("random", "swiglu", torch.float32, 2)
    with pytest.raises(backends.BackendUnavailable, match="CUBLAS_STATUS_NOT_SUPPORTED"):
        moe._moe_ffn_te(x, probs, idx, w1, w2, "swiglu", requested="te")
    with caplog.at_level("WARNING", logger="megatron_ext.backends"):
        assert moe._moe_ffn_te(x, probs, idx, w1, w2, "swiglu", requested="auto") is None
    (rec,) = [r for r in backends.records() if r["op"] == "moe_ffn"]
    assert (rec["requested"], rec["observed"]) == ("te", "torch")
    assert "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED" in rec["reason"]
    assert any("CUBLAS_STATUS_NOT_SUPPORTED" in r.getMessage() for r in caplog.records)
    why = moe._te_probe(x, w1, w2)()
    assert why.startswith("TE's grouped GEMM failed here earlier in this run: RuntimeError")
    assert calls == ["NN", "NN"]

    backends.reset()   # forgets the failure
    install_te(_signature_2_11)
    out = moe._moe_ffn_te(x, probs, idx, w1, w2, "swiglu", requested="auto")
    torch.testing.assert_close(out, moe.moe_ffn_reference(x, probs, idx, w1, w2, "swiglu"),
                               rtol=1e-5, atol=1e-5)
    install_te(broken)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_NOT_SUPPORTED"):
        moe._moe_ffn_te(x, probs, idx, w1, w2, "swiglu", requested="auto")


@pytest.mark.parametrize("have_te,device,message", [
    (False, "auto", "transformer_engine is not installed"),
    (True, "cpu", "device='cpu': it runs on CUDA tensors"),
])
def test_backend_te_is_checked_at_config_time(install_te, have_te, device, message):
    from megatron_ext.config import ConfigError, TrainConfig, validate

    if have_te:
        install_te(_signature_2_11)
    elif _real_te():
        pytest.skip("a real Transformer Engine is installed")
    else:
        te_grouped._grouped_gemm.cache_clear()
    with pytest.raises(ConfigError, match=r"moe_backend='te'") as err:
        validate(TrainConfig(num_experts=4, moe_backend="te", device=device), world_size=1)
    assert message in str(err.value) and "use auto, triton or grouped_mm" in str(err.value)


# ----------------------------------------------------------------------------- the real TE

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not _real_te(), reason="needs Transformer Engine")
def test_gpu_te_lane_bf16_against_fp32():
    te_grouped._grouped_gemm.cache_clear()
    assert te_grouped.unavailable() is None
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, Fd, E, k = 1000, 512, 384, 16, 4
    x = torch.randn(T, H, device="cuda", generator=g)
    scores = torch.rand(T, E - 1, device="cuda", generator=g)
    scores[:, 3] += 0.5                             # a skewed expert; expert E-1 gets no token
    idx = scores.topk(k, dim=-1).indices
    probs = torch.rand(T, k, device="cuda", generator=g)
    w1 = torch.randn(E, H, 2 * Fd, device="cuda", generator=g) * H ** -0.5
    w2 = torch.randn(E, Fd, H, device="cuda", generator=g) * Fd ** -0.5
    dout = torch.randn(T, H, device="cuda", generator=g)
    bf = [t.bfloat16() for t in (x, probs)] + [idx] + [t.bfloat16() for t in (w1, w2)]
    y_ref, g_ref = _grads(lambda *a: moe.moe_ffn_reference(*a, "swiglu"),
                          *[t.float() if t.is_floating_point() else t for t in bf], dout)
    y, gr = _grads(lambda *a: moe.moe_ffn(*a, "swiglu", backend="te"), *bf, dout.bfloat16())
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(gr, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)
