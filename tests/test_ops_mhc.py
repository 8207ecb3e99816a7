"""mHC stream mixers (megatron_ext.ops.mhc): the torch reference against independent fp64 math,
and the Triton kernels (n = 4) against the reference, forward and every gradient.

CPU lane: the kernels run in Triton's interpreter on tiny shapes. On a CUDA host they compile
and run on the GPU (same tests, tf32-aware tolerances), plus the full-size bf16 ``gpu`` tests.
"""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402  (torch does not read TRITON_INTERPRET; triton reads it lazily)

# Interpret only where there is no GPU (on a CUDA host the same tests compile and run there). The
# kernel modules are imported below while this holds (triton.jit decides at import); the variable
# is then put back as it was and set again only while this file's tests run (the _interpreter
# fixture), so that other test files in the session (e.g. module tests on backend="auto") do not
# silently route through the slow interpreter.
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops import mhc  # noqa: E402
from megatron_ext.ops.mhc import reference as ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
try:
    # imports the kernel modules now, while the environment above holds
    from megatron_ext.ops.mhc._triton_util import kernels_interpreted
    TRITON_WHY_NOT = None if kernels_interpreted() == (DEVICE == "cpu") else (
        f"the mHC kernels were imported (by an earlier test file) with the wrong TRITON_INTERPRET "
        f"for {DEVICE} tensors")
except ImportError:  # pragma: no cover
    TRITON_WHY_NOT = "triton is not installed"
if _PREV_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET
needs_triton = pytest.mark.skipif(TRITON_WHY_NOT is not None, reason=str(TRITON_WHY_NOT))
needs_gpu = pytest.mark.skipif(DEVICE != "cuda" or TRITON_WHY_NOT is not None,
                               reason="needs CUDA with compiled triton (TRITON_INTERPRET unset)")

# max |a - b| / max(1, max |b|) per dtype of the compared tensor. The fused op's dots are tf32 on
# a GPU (see _triton_util.DOT_PRECISION), exact fp32 in the interpreter.
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 3e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
    yield
    if prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = prev


@pytest.fixture(autouse=True)
def _clean_records():
    backends.reset()
    yield
    backends.reset()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(grad)


def _err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _params(gen, n, c, grad=True):
    """phi/alpha/bias at a scale where every mapping is away from saturation (alpha ~ 1, not 0.01,
    so that the tests see the Sinkhorn and sigmoid derivatives, not their flat init regime)."""
    m = n * n + 2 * n
    phi = _randn(gen, n * c, m, scale=1.0 / math.sqrt(n * c), grad=grad)
    alpha = torch.tensor([0.8, 1.1, 1.3], device=DEVICE).requires_grad_(grad)
    bias = _randn(gen, m, scale=0.3, grad=grad)
    return phi, alpha, bias


# ------------------------------------------------------------------ reference: Sinkhorn and mixer


def test_sinkhorn_rows_and_columns_sum_to_one():
    g = _gen(1)
    for n in (3, 4, 5):
        m = ref.sinkhorn(torch.randn(64, n, n, generator=g) * 0.5)
        assert m.dtype == torch.float32
        assert (m.sum(-1) - 1).abs().max() < 1e-5
        assert (m.sum(-2) - 1).abs().max() < 1e-5
        assert (m > 0).all()


def test_sinkhorn_finite_iterations_are_not_exact_for_peaked_logits():
    # the mHC-lite pitfall: 20 rounds leave a row error on peaked logits; more rounds close it
    logits = torch.randn(64, 4, 4, generator=_gen(2)) * 3.0
    assert (ref.sinkhorn(logits, 20).sum(-1) - 1).abs().max() > 1e-4
    assert (ref.sinkhorn(logits, 2000).sum(-1) - 1).abs().max() < 1e-5


def test_sinkhorn_is_invariant_to_row_shifts():
    logits = torch.randn(8, 4, 4, generator=_gen(3))
    shift = torch.randn(8, 4, 1, generator=_gen(4)) * 10
    assert torch.allclose(ref.sinkhorn(logits + shift), ref.sinkhorn(logits), atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda: ref.sinkhorn(torch.zeros(4, 4), num_iters=0),
    lambda: mhc.sinkhorn(torch.zeros(4, 4), num_iters=0, backend="torch"),
    lambda: mhc.sinkhorn(torch.zeros(4, 4), num_iters=-3),
    lambda: mhc.mhc_mix_pre(torch.zeros(1, 1, 4, 8), torch.zeros(32, 24), torch.zeros(3),
                            torch.zeros(24), num_iters=0),
])
def test_num_iters_below_one_is_a_value_error(call):
    with pytest.raises(ValueError, match=r"num_iters=(0|-3): .*; use an integer >= 1"):
        call()


def test_branch_mixer_n2_is_a_temperature_softmax():
    logits = torch.randn(5, 2, 2, generator=_gen(5))
    w = ref.branch_mix_weights(logits, temperature=0.7)
    assert torch.allclose(w, torch.softmax(logits / 0.7, dim=-1), atol=1e-6)
    blended = ref.branch_mix_weights(logits, temperature=0.7, blend_alpha=0.25)
    assert torch.allclose(blended, 0.25 * torch.softmax(logits / 0.7, -1) + 0.75 / 2, atol=1e-6)


def test_branch_mixer_general_n_is_sinkhorn_blended_with_uniform():
    logits = torch.randn(3, 4, 4, generator=_gen(6)) * 0.5
    w = ref.branch_mix_weights(logits, temperature=2.0, blend_alpha=0.6)
    sk = ref.sinkhorn(logits / 2.0)
    sk = sk / sk.sum(-1, keepdim=True)
    assert torch.allclose(w, 0.6 * sk + 0.4 / 4, atol=1e-6)
    assert (w.sum(-1) - 1).abs().max() < 1e-5 and (w.sum(-2) - 1).abs().max() < 1e-5
    assert torch.allclose(ref.branch_mix_weights(logits, blend_alpha=0.0), torch.full_like(w, 0.25))


@pytest.mark.parametrize("kwargs, field", [({"blend_alpha": 1.5}, "blend_alpha=1.5"),
                                           ({"temperature": 0.0}, "temperature=0.0")])
def test_branch_mixer_rejects_out_of_range_knobs(kwargs, field):
    with pytest.raises(ValueError, match=field + r": .*; use "):
        ref.branch_mix_weights(torch.zeros(4, 4), **kwargs)


# ------------------------------------------------------------------ reference vs independent fp64


def _naive_mappings(x_flat, phi, alpha, bias, n, num_iters, eps, rms_eps):
    """Python-float (fp64) loops, written from the paper's equations independently of reference.py."""
    x_flat, phi, alpha, bias = (t.detach().double().tolist() for t in (x_flat, phi, alpha, bias))
    pre, post, res = [], [], []
    for x in x_flat:
        k = len(x)
        r = math.sqrt(sum(v * v for v in x) / k + rms_eps)
        z = [sum(x[i] * phi[i][j] for i in range(k)) / r for j in range(len(bias))]
        gate = [alpha[0]] * n + [alpha[1]] * n + [alpha[2]] * (n * n)
        lg = [gate[j] * z[j] + bias[j] for j in range(len(bias))]
        pre.append([1 / (1 + math.exp(-v)) for v in lg[:n]])
        post.append([2 / (1 + math.exp(-v)) for v in lg[n:2 * n]])
        m = [lg[2 * n + i * n:2 * n + (i + 1) * n] for i in range(n)]
        m = [[math.exp(v - max(row)) for v in row] for row in m]
        for _ in range(num_iters):
            m = [[v / max(sum(row), eps) for v in row] for row in m]
            cols = [max(sum(m[i][j] for i in range(n)), eps) for j in range(n)]
            m = [[m[i][j] / cols[j] for j in range(n)] for i in range(n)]
        res.append(m)
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_t(pre), as_t(post), as_t(res)


def test_folded_norm_reference_is_rmsnorm_of_the_fp32_pre_mix():
    """``norm_weight``: the first output is rms_norm(u) * w of the unrounded u (fp64 check), and
    the fp32 reference stays within fp32 rounding of it even for bf16 streams."""
    g = _gen(8)
    x = torch.randn(3, 2, 4, 16, generator=g).to(torch.bfloat16)
    phi = torch.randn(64, 24, generator=g) / 8
    alpha, bias = torch.tensor([0.8, 1.1, 1.3]), torch.randn(24, generator=g) * 0.3
    w = 1 + 0.3 * torch.randn(16, generator=g)
    h_pre = ref.mhc_mappings(x.double().reshape(6, 64), phi.double(), alpha.double(), bias.double(), 4)[0]
    u = (h_pre.view(3, 2, 4, 1) * x.double()).sum(2)
    want = u / torch.sqrt(u.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    got64 = ref.mhc_mix_pre(x.double(), phi.double(), alpha.double(), bias.double(), norm_weight=w.double())[0]
    assert (got64 - want).abs().max() < 1e-12
    got = ref.mhc_mix_pre(x, phi, alpha, bias, norm_weight=w)[0]
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() / want.abs().clamp_min(1)).max() < 8e-3  # bf16 output rounding


@pytest.mark.parametrize("n", [2, 4])
def test_mappings_match_fp64_naive_math(n):
    g = _gen(7)
    c = 8
    x = torch.randn(3, n * c, generator=g).to(torch.bfloat16)
    phi = torch.randn(n * c, n * n + 2 * n, generator=g) / math.sqrt(n * c)
    alpha, bias = torch.tensor([0.8, 1.1, 1.3]), torch.randn(n * n + 2 * n, generator=g) * 0.3
    naive = _naive_mappings(x, phi, alpha, bias, n, 20, 1e-6, 1e-6)
    got32 = ref.mhc_mappings(x, phi, alpha, bias, n)
    got64 = ref.mhc_mappings(x.double(), phi.double(), alpha.double(), bias.double(), n)
    for a, b, c64 in zip(got32, naive, got64):
        assert a.dtype == torch.float32 and c64.dtype == torch.float64
        assert (a.double() - b).abs().max() < 2e-6
        assert (c64 - b).abs().max() < 1e-12


def test_stream_ops_match_the_seed_einsums_in_fp64():
    g = _gen(8)
    s, b, n, c = 3, 2, 4, 16
    x = torch.randn(s, b, n, c, generator=g)
    f = torch.randn(s, b, c, generator=g)
    h_pre, h_post = torch.rand(s, b, n, generator=g), torch.rand(s, b, n, generator=g) * 2
    h_res = ref.sinkhorn(torch.randn(s, b, n, n, generator=g))
    x64, f64, hp64, hq64, hr64 = (t.double() for t in (x, f, h_pre, h_post, h_res))
    u = torch.einsum("sbn,sbnc->sbc", hp64, x64)
    mixed = torch.einsum("sbnm,sbmc->sbnc", hr64, x64) + hq64[..., None] * f64[..., None, :]
    assert (ref.mhc_pre(x, h_pre).double() - u).abs().max() < 1e-5
    assert (ref.mhc_post_res(x, h_res, h_post, f).double() - mixed).abs().max() < 1e-5
    # static mappings broadcast over tokens
    u_static = torch.einsum("n,sbnc->sbc", hp64[0, 0], x64)
    assert (ref.mhc_pre(x, h_pre[0, 0]).double() - u_static).abs().max() < 1e-5
    mix_static = torch.einsum("nm,sbmc->sbnc", hr64[0, 0], x64) + hq64[0, 0, :, None] * f64[..., None, :]
    assert (ref.mhc_post_res(x, h_res[0, 0], h_post[0, 0], f).double() - mix_static).abs().max() < 1e-5


# ------------------------------------------------------------------ Triton vs reference


def _grads(out, gen):
    outs = out if isinstance(out, tuple) else (out,)
    gouts = [_randn(gen, *o.shape, dtype=o.dtype) for o in outs]
    return outs, gouts


def _compare(fn, inputs, gen, tol_for):
    """fn(*inputs, backend=...) for triton and torch: outputs and the grads of every input."""
    out_t = fn(*inputs, backend="triton")
    out_r = fn(*inputs, backend="torch")
    outs_t, gouts = _grads(out_t, gen)
    outs_r = out_r if isinstance(out_r, tuple) else (out_r,)
    for a, b in zip(outs_t, outs_r):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _err(a, b) < tol_for(b), ("forward", a.shape, _err(a, b))
    g_t = torch.autograd.grad(outs_t, inputs, gouts)
    g_r = torch.autograd.grad(outs_r, inputs, gouts)
    for i, (a, b) in enumerate(zip(g_t, g_r)):
        assert a.shape == inputs[i].shape and a.dtype == inputs[i].dtype
        assert _err(a, b) < tol_for(b), ("grad", i, tuple(a.shape), _err(a, b))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c", [32, 48])
def test_triton_mix_pre_matches_reference(dtype, c):
    g = _gen(10 + c)
    x = _randn(g, 2, 3, 4, c, dtype=dtype, grad=True)
    phi, alpha, bias = _params(g, 4, c)
    # fp32 grads of the fp32 params still carry the streams' rounding of dx-independent terms only
    _compare(mhc.mhc_mix_pre, (x, phi, alpha, bias), g, lambda t: TOL[dtype])


@needs_triton
def test_triton_mix_pre_many_tokens_and_splits():
    # > 64 tokens: several programs per kernel and several d phi token splits
    g = _gen(11)
    x = _randn(g, 65, 1, 4, 16, grad=True)
    phi, alpha, bias = _params(g, 4, 16)
    _compare(mhc.mhc_mix_pre, (x, phi, alpha, bias), g, lambda t: TOL[torch.float32])


@needs_triton
def test_triton_mix_pre_uneven_column_splits():
    # 4C = 1280 columns: the projection runs two column splits, 1024 + 256, whose partials the
    # maps kernel sums in order (every other test fits one split)
    from megatron_ext.ops.mhc import triton_mix

    assert triton_mix.PROJ_COLS_PER_SPLIT == 1024
    g = _gen(13)
    x = _randn(g, 3, 2, 4, 320, grad=True)
    phi, alpha, bias = _params(g, 4, 320)
    _compare(mhc.mhc_mix_pre, (x, phi, alpha, bias), g, lambda t: TOL[torch.float32])


def _folded(x, phi, alpha, bias, w, backend):
    return mhc.mhc_mix_pre(x, phi, alpha, bias, backend=backend, norm_weight=w, norm_eps=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 3, 32)), (torch.float16, (2, 3, 48)),
                                         (torch.float32, (65, 1, 16)), (torch.float32, (3, 1, 320))])
def test_triton_folded_norm_matches_reference(dtype, shape):
    """The branch's RMSNorm folded into the pre mix: the normed output and the gradients of the
    streams, the mapping parameters and the norm weight. (65 tokens: several programs and dx
    token blocks, so several d(norm weight) partial rows; C = 320: rows walked in several tiles.)"""
    s, b, c = shape
    g = _gen(14 + c)
    x = _randn(g, s, b, 4, c, dtype=dtype, grad=True)
    phi, alpha, bias = _params(g, 4, c)
    w = (1 + _randn(g, c, scale=0.3)).requires_grad_()
    _compare(_folded, (x, phi, alpha, bias, w), g, lambda t: TOL[dtype])


@needs_triton
def test_triton_folded_norm_site_with_link():
    """The folded site as the layer runs it: linked streams into post/res, a branch on the normed
    input, against the reference, every gradient including the norm weight's."""
    g = _gen(15)
    x = _randn(g, 2, 3, 4, 32, grad=True)
    phi, alpha, bias = _params(g, 4, 32)
    w = (1 + _randn(g, 32, scale=0.3)).requires_grad_()
    lin = _randn(g, 32, 32, scale=0.2)

    def site(x, phi, alpha, bias, w, backend):
        n, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend=backend,
                                                          norm_weight=w)
        return mhc.mhc_post_res(x_link, h_res, h_post, torch.tanh(n @ lin), backend=backend)

    _compare(site, (x, phi, alpha, bias, w), g, lambda t: TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16])
def test_triton_site_takes_16bit_mixer_params_without_casts(pdtype):
    """A bf16 model's mixer weights (Megatron's Float16Module casts them) go to the kernels as
    they are: the kernels widen them on load, so (interpreter) the outputs equal those of the same
    values in fp32, and each gradient comes back in its parameter's dtype, the fp32 sum rounded
    once."""
    g = _gen(16)
    x = _randn(g, 9, 2, 4, 32, grad=True)
    phi, alpha, bias = _params(g, 4, 32, grad=False)
    w = 1 + _randn(g, 32, scale=0.3)
    low = [t.to(pdtype).requires_grad_() for t in (phi, alpha, bias, w)]
    wide = [t.detach().float().requires_grad_() for t in low]
    go = [_randn(g, 9, 2, 32), _randn(g, 9, 2, 4), _randn(g, 9, 2, 4, 4), _randn(g, 9, 2, 4, 32)]
    res = []
    for params in (low, wide):
        outs = mhc.mhc_mix_pre_linked(x, *params[:3], backend="triton", norm_weight=params[3])
        res.append((outs, torch.autograd.grad(outs, [x] + params, go)))
    (outs_l, grads_l), (outs_w, grads_w) = res
    for a, b, p in zip(grads_l[1:], grads_w[1:], low):
        assert a.dtype == pdtype and a.shape == p.shape
    if DEVICE == "cuda":
        # the GPU compiles the two weight dtypes' fp32-stream projections differently (fp32
        # weights take TF32 dots): equal within the lane's tolerance, the 16-bit-weight lane the
        # closer to fp64 (measured at C=2048: 2e-4 vs 1.5e-2 on the mappings)
        for a, b in zip(outs_l + grads_l[:1], outs_w + grads_w[:1]):
            assert _err(a, b) < TOL[torch.float32]
        for a, b in zip(grads_l[1:], grads_w[1:]):
            assert _err(a, b) < TOL[torch.float32] + TOL[pdtype]
        return
    for a, b in zip(outs_l, outs_w):
        assert torch.equal(a, b)
    assert torch.equal(grads_l[0], grads_w[0])
    # rounded once; the interpreter's fp32 -> 16-bit cast may land on either neighbour (the GPU
    # rounds to nearest even), so within one unit in the last place
    for a, b in zip(grads_l[1:], grads_w[1:]):
        assert ((a.float() - b).abs() <= torch.finfo(pdtype).eps * b.abs()).all()


@needs_triton
def test_triton_site_with_zero_tokens():
    """No tokens (an empty micro-batch shard): empty outputs, zero parameter gradients."""
    g = _gen(17)
    x = _randn(g, 0, 2, 4, 32, grad=True)
    phi, alpha, bias = _params(g, 4, 32)
    w = (1 + _randn(g, 32, scale=0.3)).requires_grad_()
    n, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend="triton",
                                                      norm_weight=w)
    out = mhc.mhc_post_res(x_link, h_res, h_post, n, backend="triton")
    assert out.shape == x.shape
    grads = torch.autograd.grad(out.sum(), (x, phi, alpha, bias, w))
    assert grads[0].shape == x.shape
    for gr, p in zip(grads[1:], (phi, alpha, bias, w)):
        assert gr.shape == p.shape and not gr.abs().sum().item()


def _tuned_kernels():
    """{name: TunedKernel} of every autotuned mHC kernel."""
    from megatron_ext.ops.mhc import triton_mix, triton_sinkhorn, triton_streams
    from megatron_ext.ops.mhc._triton_util import TunedKernel

    return {f"{m.__name__.rsplit('.', 1)[-1]}.{name}": k
            for m in (triton_mix, triton_sinkhorn, triton_streams)
            for name, k in vars(m).items() if isinstance(k, TunedKernel)}


class _NoAutotuner:
    def __getitem__(self, grid):
        raise AssertionError("the autotuner ran while the tilings were pinned")


@pytest.fixture
def pinned(monkeypatch):
    """Tilings pinned for one test (the flag is process-wide; restored afterwards)."""
    monkeypatch.setattr(mhc, "_PIN_TILINGS", False)
    mhc.pin_tilings(True)
    yield monkeypatch


@needs_triton
def test_pinned_tilings_skip_the_autotuner_and_match_the_reference(pinned):
    """Deterministic mode: every launch takes its kernel's pinned tiling, a function of the shape
    alone, the autotuner never runs, and the results are the reference's: the folded linked site, the unfolded mix-pre, the static stream ops, Sinkhorn."""
    kernels = _tuned_kernels()
    assert len(kernels) == 11, sorted(kernels)
    for k in kernels.values():
        pinned.setattr(k, "tuner", _NoAutotuner())
        pinned.setattr(k, "_pinned", {})
        pinned.setattr(k, "best_config", None)
    g = _gen(18)
    c = 48
    x = _randn(g, 5, 3, 4, c, grad=True)
    phi, alpha, bias = _params(g, 4, c)
    w = (1 + _randn(g, c, scale=0.3)).requires_grad_()
    lin = _randn(g, c, c, scale=0.2)

    def site(x, phi, alpha, bias, w, backend):
        n, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend=backend,
                                                          norm_weight=w)
        return mhc.mhc_post_res(x_link, h_res, h_post, torch.tanh(n @ lin), backend=backend)

    _compare(site, (x, phi, alpha, bias, w), g, lambda t: TOL[torch.float32])
    _compare(lambda *a, backend: mhc.mhc_mix_pre(*a, backend=backend), (x, phi, alpha, bias), g,
             lambda t: TOL[torch.float32])
    h_pre, h_post = torch.rand(4, generator=g).to(DEVICE), torch.rand(4, generator=g).to(DEVICE)
    h_res = ref.sinkhorn(torch.randn(4, 4, generator=g)).to(DEVICE)
    f = _randn(g, 5, 3, c, grad=True)
    _compare(lambda x, f, backend: mhc.mhc_post_res(x, h_res, h_post, f, backend=backend), (x, f), g,
             lambda t: TOL[torch.float32])
    _compare(lambda x, backend: mhc.mhc_pre(x, h_pre, backend=backend), (x,), g,
             lambda t: TOL[torch.float32])
    logits = _randn(g, 7, 4, 4, grad=True)
    _compare(lambda l, backend: mhc.sinkhorn(l, backend=backend), (logits,), g,
             lambda t: TOL[torch.float32])
    for name, k in kernels.items():
        assert k.best_config is not None, f"{name} did not run"
        names = [n for _, n in k._key_pos]
        assert k._pinned and all(cfg is k.pinned_config(**dict(zip(names, key)))
                                 for key, cfg in k._pinned.items()), name
    # narrow rows: most one-token row kernels take 512-channel tiles over one warp, the static pre
    # backward 256 over four, the post/res forward 128 over two
    widths = {name.rsplit(".", 1)[1]: k.best_config.kwargs.get("BLOCK_C") for name, k in kernels.items()}
    assert widths == dict(_mix_proj_kernel=None, _mix_maps_pre_kernel=512, _pre_norm_bwd_dh_kernel=512,
                          _mix_pre_bwd_dx_kernel=64, _mix_pre_bwd_dphi_kernel=None, _sinkhorn_fwd_kernel=None,
                          _sinkhorn_bwd_kernel=None, _pre_fwd_kernel=512, _pre_bwd_kernel=256,
                          _post_res_fwd_kernel=128, _post_res_bwd_kernel=512), widths
    assert {k.best_config.num_warps for name, k in kernels.items() if widths[name.rsplit(".", 1)[1]] == 512} == {1}


@needs_triton
def test_pinned_tilings_do_not_follow_the_sm_count(pinned):
    """The backward's d phi token splits (the order of its sum) follow the GPU's SM count unless
    the tilings are pinned: pinned, every SM count gets the 132-SM GPU's splits."""
    from megatron_ext.ops.mhc import triton_mix

    def splits(sms, T=65536, NC=8192):
        pinned.setattr(triton_mix, "_num_sms", lambda device: sms)
        return triton_mix.dphi_splits(T, NC, torch.device(DEVICE))

    assert {splits(sms) for sms in (1, 78, 114, 132, 148)} == {(9, 7296)}
    assert splits(132, T=256, NC=512) == (2, 128)
    mhc.pin_tilings(False)
    assert [splits(sms)[0] for sms in (78, 114, 132)] == [5, 8, 9]
    assert splits(1, T=256, NC=512) == (1, 256)


@needs_triton
def test_triton_mix_pre_with_only_u_used():
    g = _gen(12)
    x = _randn(g, 2, 3, 4, 32, grad=True)
    phi, alpha, bias = _params(g, 4, 32)
    outs = [mhc.mhc_mix_pre(x, phi, alpha, bias, backend=be)[0] for be in ("triton", "torch")]
    go = _randn(g, *outs[0].shape)
    grads = [torch.autograd.grad(o, (x, phi, alpha, bias), go) for o in outs]
    for a, b in zip(*grads):
        assert _err(a, b) < TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_triton_pre_matches_reference(dtype, static):
    g = _gen(20)
    x = _randn(g, 2, 3, 4, 48, dtype=dtype, grad=True)
    h_pre = torch.rand((4,) if static else (2, 3, 4), generator=g).to(DEVICE).requires_grad_()
    _compare(mhc.mhc_pre, (x, h_pre), g, lambda t: TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_triton_post_res_matches_reference(dtype, static):
    g = _gen(30)
    lead = () if static else (2, 3)
    x = _randn(g, 2, 3, 4, 32, dtype=dtype, grad=True)
    h_res = ref.sinkhorn(torch.randn(*lead, 4, 4, generator=g)).to(DEVICE).requires_grad_()
    h_post = (2 * torch.rand(*lead, 4, generator=g)).to(DEVICE).requires_grad_()
    f = _randn(g, 2, 3, 32, dtype=dtype, grad=True)
    _compare(mhc.mhc_post_res, (x, h_res, h_post, f), g, lambda t: TOL[dtype])


@needs_triton
def test_triton_sinkhorn_matches_reference():
    g = _gen(40)
    logits = _randn(g, 3, 5, 4, 4, grad=True)
    _compare(lambda lg, backend: mhc.sinkhorn(lg, 20, 1e-6, backend=backend), (logits,), g,
             lambda t: 1e-5)


@needs_triton
def test_triton_site_composes_like_the_reference():
    """One sublayer site, mix_pre -> branch -> post_res, through autograd end to end."""
    g = _gen(50)
    x = _randn(g, 2, 3, 4, 32, grad=True)
    phi, alpha, bias = _params(g, 4, 32)
    w = _randn(g, 32, 32, scale=0.2)

    def site(x, phi, alpha, bias, backend):
        u, h_post, h_res = mhc.mhc_mix_pre(x, phi, alpha, bias, backend=backend)
        return mhc.mhc_post_res(x, h_res, h_post, torch.tanh(u @ w), backend=backend)

    _compare(site, (x, phi, alpha, bias), g, lambda t: TOL[torch.float32])


@needs_triton
def test_triton_linked_site_sums_the_stream_gradients_in_kernel():
    """The linked form (post_res fed the view mix_pre returns) gives the same values and grads as
    feeding the streams themselves; with only the link used, dx is the post/res gradient alone."""
    g = _gen(51)
    x = _randn(g, 2, 3, 4, 32, grad=True)
    phi, alpha, bias = _params(g, 4, 32)
    w = _randn(g, 32, 32, scale=0.2)

    def site(x, phi, alpha, bias, backend):
        u, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend=backend)
        return mhc.mhc_post_res(x_link, h_res, h_post, torch.tanh(u @ w), backend=backend)

    _compare(site, (x, phi, alpha, bias), g, lambda t: TOL[torch.float32])
    x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend="triton")[3]
    assert torch.equal(x_link, x)
    gy = _randn(g, *x.shape)
    (dx,) = torch.autograd.grad(x_link, x, gy)
    torch.testing.assert_close(dx, gy, atol=0, rtol=0)


# ------------------------------------------------------------------ backend selection and errors


def test_auto_falls_back_to_torch_for_three_streams_and_records_why(caplog):
    caplog.set_level(logging.INFO, logger="megatron_ext.backends")
    g = _gen(60)
    x = _randn(g, 2, 1, 3, 8)
    h = torch.rand(3, generator=g).to(DEVICE)
    for _ in range(2):
        u = mhc.mhc_pre(x, h)
    assert torch.equal(u, ref.mhc_pre(x, h))
    rec = [r for r in backends.records() if r["op"] == "mhc_pre"]
    assert len(rec) == 1 and rec[0]["observed"] == "torch" and rec[0]["count"] == 2
    if TRITON_WHY_NOT is None:
        assert "num_streams=3" in rec[0]["reason"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_forcing_triton_on_three_streams_raises_naming_the_value():
    g = _gen(61)
    x = _randn(g, 2, 1, 3, 8)
    with pytest.raises(backends.BackendUnavailable, match=r"backend='triton' for mhc_(pre|mix_pre)"):
        mhc.mhc_pre(x, torch.rand(3).to(DEVICE), backend="triton")
    if TRITON_WHY_NOT is None:
        with pytest.raises(backends.BackendUnavailable, match=r"num_streams=3"):
            mhc.mhc_mix_pre(x, torch.zeros(24, 15, device=DEVICE), torch.zeros(3, device=DEVICE),
                            torch.zeros(15, device=DEVICE), backend="triton")


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 1, 4, 8, generator=_gen(62))
    mhc.sinkhorn(torch.randn(4, 4, generator=_gen(63)))
    mhc.mhc_pre(x, torch.rand(4, generator=_gen(64)))
    for rec in backends.records():
        assert rec["observed"] == "torch"
        assert "TRITON_INTERPRET" in rec["reason"] or "triton is not installed" in rec["reason"]
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET|not installed"):
        mhc.mhc_pre(x, torch.rand(4, generator=_gen(64)), backend="triton")


@pytest.mark.skipif(DEVICE != "cpu" or TRITON_WHY_NOT is not None,
                    reason="the CPU interpreter lane (kernels imported under TRITON_INTERPRET)")
@pytest.mark.parametrize("value", ["true", " 1 ", "ON"])
def test_cpu_interpreter_spellings_triton_accepts_run_the_kernels(monkeypatch, value):
    """Triton's interpreter switch accepts 1/true/yes/on (any case); the probe reads it the same
    way (it used to require exactly '1' and fell back to torch on the others)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    x = torch.randn(2, 1, 4, 8, generator=_gen(67))
    h = torch.rand(4, generator=_gen(68))
    out = mhc.mhc_pre(x, h)
    assert [rec["observed"] for rec in backends.records()] == ["triton"]
    torch.testing.assert_close(out, ref.mhc_pre(x, h), rtol=2e-5, atol=2e-5)


def test_fp64_streams_fall_back_with_the_dtype_named():
    if TRITON_WHY_NOT is not None:
        pytest.skip("the triton probe stops before the dtype check: " + str(TRITON_WHY_NOT))
    x = torch.randn(2, 1, 4, 8, generator=_gen(65), dtype=torch.float64).to(DEVICE)
    mhc.mhc_pre(x, torch.rand(4, generator=_gen(66)).to(DEVICE))
    assert "dtype=torch.float64" in backends.records()[0]["reason"]


@pytest.mark.parametrize("call, field", [
    (lambda: mhc.mhc_pre(torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 3)), r"h_pre.shape=\(2, 3, 3\)"),
    (lambda: mhc.mhc_pre(torch.zeros(2, 3, 32), torch.zeros(4)), r"streams.shape=\(2, 3, 32\)"),
    (lambda: mhc.mhc_post_res(torch.zeros(2, 3, 4, 8), torch.zeros(4, 4), torch.zeros(4),
                              torch.zeros(2, 3, 9)), r"branch_out.shape=\(2, 3, 9\)"),
    (lambda: mhc.mhc_mix_pre(torch.zeros(2, 3, 4, 8), torch.zeros(32, 16), torch.zeros(3),
                             torch.zeros(24)), r"phi.shape=\(32, 16\)"),
    (lambda: mhc.mhc_mix_pre(torch.zeros(2, 3, 4, 8), torch.zeros(32, 24), torch.zeros(3),
                             torch.zeros(24), norm_weight=torch.ones(32)), r"norm_weight.shape=\(32,\)"),
])
def test_shape_errors_name_the_field(call, field):
    with pytest.raises(ValueError, match=field + r": .*; use "):
        call()


# ------------------------------------------------------------------ GPU: full size, bf16

FULL = dict(s=4096, b=2, c=2048)


def _full_inputs(dtype=torch.bfloat16):
    g = _gen(70)
    s, b, c = FULL["s"], FULL["b"], FULL["c"]
    x = (torch.randn(s, b, 4, c, generator=g)).to("cuda", dtype).requires_grad_()
    phi = (torch.randn(4 * c, 24, generator=g) / math.sqrt(4 * c)).cuda().requires_grad_()
    alpha = torch.tensor([0.8, 1.1, 1.3], device="cuda").requires_grad_()
    bias = (torch.randn(24, generator=g) * 0.3).cuda().requires_grad_()
    return x, phi, alpha, bias


@pytest.mark.gpu
@needs_gpu
def test_gpu_full_size_mix_pre_bf16():
    torch.cuda.manual_seed(0)
    x, phi, alpha, bias = _full_inputs()
    gen = _gen(71)
    outs_t = mhc.mhc_mix_pre(x, phi, alpha, bias, backend="triton")
    outs_r = mhc.mhc_mix_pre(x, phi, alpha, bias, backend="torch")
    gouts = [(torch.randn(*o.shape, generator=gen)).to("cuda", o.dtype) for o in outs_t]
    for a, b in zip(outs_t, outs_r):
        assert _err(a, b) < TOL[b.dtype]
    g_t = torch.autograd.grad(outs_t, (x, phi, alpha, bias), gouts)
    g_r = torch.autograd.grad(outs_r, (x, phi, alpha, bias), gouts)
    for a, b in zip(g_t, g_r):
        assert _err(a, b) < 3e-2
    # deterministic: no atomics anywhere, the parameter grads are bitwise reproducible
    g_t2 = torch.autograd.grad(mhc.mhc_mix_pre(x, phi, alpha, bias, backend="triton"),
                               (x, phi, alpha, bias), gouts)
    for a, b in zip(g_t, g_t2):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
def test_gpu_full_size_post_res_and_pre_bf16():
    gen = _gen(72)
    s, b, c = FULL["s"], FULL["b"], FULL["c"]
    x = torch.randn(s, b, 4, c, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    f = torch.randn(s, b, c, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    h_res = ref.sinkhorn(torch.randn(s, b, 4, 4, generator=gen)).cuda().requires_grad_()
    h_post = (2 * torch.rand(s, b, 4, generator=gen)).cuda().requires_grad_()
    h_pre = torch.rand(s, b, 4, generator=gen).cuda().requires_grad_()
    for fn, args in ((mhc.mhc_post_res, (x, h_res, h_post, f)), (mhc.mhc_pre, (x, h_pre))):
        out_t, out_r = fn(*args, backend="triton"), fn(*args, backend="torch")
        assert _err(out_t, out_r) < TOL[torch.bfloat16]
        go = torch.randn(*out_t.shape, generator=gen).to("cuda", out_t.dtype)
        for a, b_ in zip(torch.autograd.grad(out_t, args, go), torch.autograd.grad(out_r, args, go)):
            assert _err(a, b_) < 3e-2


@pytest.mark.gpu
@needs_gpu
def test_gpu_full_size_folded_norm_site_bf16():
    """The folded site at full size in bf16 against the reference, every gradient (the norm
    weight's included), and bitwise reproducible."""
    x, phi, alpha, bias = _full_inputs()
    gen = _gen(74)
    w = (1 + 0.3 * torch.randn(FULL["c"], generator=gen)).cuda().requires_grad_()
    args = (x, phi, alpha, bias, w)

    def site(backend):
        n, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend=backend,
                                                          norm_weight=w)
        return mhc.mhc_post_res(x_link, h_res, h_post, n, backend=backend)

    out_t, out_r = site("triton"), site("torch")
    assert _err(out_t, out_r) < TOL[torch.bfloat16]
    go = torch.randn(*out_t.shape, generator=gen).to("cuda", out_t.dtype)
    g_t = torch.autograd.grad(out_t, args, go)
    g_r = torch.autograd.grad(out_r, args, go)
    for a, b in zip(g_t, g_r):
        assert _err(a, b) < 3e-2
    for a, b in zip(g_t, torch.autograd.grad(site("triton"), args, go)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
def test_gpu_full_size_linked_site_bf16():
    """The site as the layer runs it (mix-pre, identity branch, post/res on the linked streams,
    whose gradient the mix-pre backward sums in its dx pass) against the reference, every grad."""
    x, phi, alpha, bias = _full_inputs()
    gen = _gen(73)

    def site(backend):
        u, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend=backend)
        return mhc.mhc_post_res(x_link, h_res, h_post, u, backend=backend)

    out_t, out_r = site("triton"), site("torch")
    assert _err(out_t, out_r) < TOL[torch.bfloat16]
    go = torch.randn(*out_t.shape, generator=gen).to("cuda", out_t.dtype)
    g_t = torch.autograd.grad(out_t, (x, phi, alpha, bias), go)
    g_r = torch.autograd.grad(out_r, (x, phi, alpha, bias), go)
    for a, b in zip(g_t, g_r):
        assert _err(a, b) < 3e-2


# One process's pinned full-size site: the sha256 of its outputs and every gradient. "warm": the
# autotuner picks its own tilings for every kernel first (what a process without the knob does).
_PINNED_SITE = r"""
import hashlib, math, sys
import torch
from megatron_ext.ops import mhc

g = torch.Generator().manual_seed(75)
s, b, c = 4096, 2, 2048
x = torch.randn(s, b, 4, c, generator=g).to("cuda", torch.bfloat16).requires_grad_()
phi = (torch.randn(4 * c, 24, generator=g) / math.sqrt(4 * c)).cuda().requires_grad_()
alpha = torch.tensor([0.8, 1.1, 1.3], device="cuda").requires_grad_()
bias = (torch.randn(24, generator=g) * 0.3).cuda().requires_grad_()
w = (1 + 0.3 * torch.randn(c, generator=g)).cuda().requires_grad_()
go = torch.randn(s, b, 4, c, generator=g).to("cuda", torch.bfloat16)


def site():
    n, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend="triton",
                                                      norm_weight=w)
    out = mhc.mhc_post_res(x_link, h_res, h_post, n, backend="triton")
    return [out, *torch.autograd.grad(out, (x, phi, alpha, bias, w), go)]


if sys.argv[1] == "warm":
    site()
mhc.pin_tilings(True)
digest = hashlib.sha256()
for t in site():
    digest.update(t.detach().float().cpu().numpy().tobytes())
print("digest", digest.hexdigest())
"""


@pytest.mark.gpu
@needs_gpu
def test_gpu_pinned_tilings_give_the_same_bits_in_every_process():
    """Deterministic mode at full size in bf16: the folded linked site's output and every
    gradient are bitwise equal in three fresh processes, one of which ran the autotuner first."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    digests = []
    for mode in ("cold", "warm", "cold"):
        run = subprocess.run([sys.executable, "-c", _PINNED_SITE, mode], cwd=ROOT, env=subprocess_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        digests.append(run.stdout.split("digest", 1)[1].strip())
    assert len(set(digests)) == 1, digests
