"""``mhc``: one mHC sublayer site (mappings + pre-aggregation + post/res mix), forward + backward.

Streams ``x [s, b, 4, C]`` bf16 (requires grad), phi ``[4C, 24]`` / alpha ``[3]`` / bias ``[24]``
fp32 parameters; the branch is the identity (``f = u``) so only the mHC ops are timed; backward
takes a random ``[s, b, 4, C]`` gradient. Full: s=4096, b=2, C=2048 (T = 8192 tokens).

ours   = ``megatron_ext.ops.mhc`` Triton kernels (mhc_mix_pre_linked + mhc_post_res, as the layer
         calls them); ``ours_graph`` = the same step replayed as one CUDA graph (GPU only): its
         time is the kernels' alone, the difference to ``ours`` the host side (launches, autograd);
         ``ours_graph_pinned`` the same with the tilings pinned (``--mhc-deterministic``);
ref    = the same ops' torch reference; the seed's einsum formulation (bf16 einsums for the stream
         mixes, fp32 mappings); a plain residual add ``x + f`` on ``[s, b, C]`` (the floor);
anchor = Megatron-LM ``HyperConnectionModule`` (``megatron.core.transformer.hyper_connection``,
         main branch only: the case is left out, with a note in the description, when the
         installed megatron-core has no such module). Its ``torch.compile`` decorators run eager
         under TORCH_COMPILE_DISABLE=1, as scripts/gpu_check.sh sets.

bytes (memory bound) = the minimal HBM traffic of the site in units of C*2 B per token:
  fwd  pre: streams 4 read + u 1 written; post/res: streams 4 + f 1 read, new streams 4 written
  bwd  post/res: grad 4 + streams 4 + f 1 read, d f 1 written; pre: d u 1 + streams 4 read,
       d streams 4 written (accumulated once)
  = 14 + 19 = 33 C*2 B per token (1.11 GB at full size, 0.37 ms at 3 TB/s). The plain add row uses
  its own minimum (x, f read, out written; grad read, 2 grads written = 6 C*2 B per token).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

from bench.cases import Benchmark, Case
from bench.registry import register

N = 4


@dataclasses.dataclass(frozen=True)
class Dims:
    s: int
    b: int
    c: int


FULL = Dims(s=4096, b=2, c=2048)
SMALL = Dims(s=32, b=2, c=64)
ANCHOR_MODULE = "megatron.core.transformer.hyper_connection"


def site_bytes(d: Dims, dtype_bytes: int = 2) -> float:
    return 33.0 * d.c * dtype_bytes * d.s * d.b


def residual_bytes(d: Dims, dtype_bytes: int = 2) -> float:
    return 6.0 * d.c * dtype_bytes * d.s * d.b


def anchor_available() -> bool:
    """Whether megatron's hyper_connection.py exists, found without importing megatron."""
    spec = importlib.util.find_spec("megatron")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(root, "core", "transformer", "hyper_connection.py")):
            return True
    return False


def _inputs(d: Dims, device: str):
    import torch

    x = torch.randn(d.s, d.b, N, d.c, device=device, dtype=torch.bfloat16, requires_grad=True)
    phi = (torch.randn(N * d.c, N * N + 2 * N, device=device) / math.sqrt(N * d.c)).requires_grad_()
    alpha = torch.full((3,), 0.01, device=device, requires_grad=True)
    bias = (0.1 * torch.randn(N * N + 2 * N, device=device)).requires_grad_()
    grad = torch.randn(d.s, d.b, N, d.c, device=device, dtype=torch.bfloat16)
    return x, phi, alpha, bias, grad


def _step(params, fwd, grad):
    def step():
        for p in params:
            p.grad = None
        fwd().backward(grad)
    return step


def _ours_setup(d: Dims, device: str, backend: str):
    from megatron_ext.ops import mhc

    x, phi, alpha, bias, grad = _inputs(d, device)

    def fwd():  # as the layer calls them: post_res takes the linked streams
        u, h_post, h_res, x_link = mhc.mhc_mix_pre_linked(x, phi, alpha, bias, backend=backend)
        return mhc.mhc_post_res(x_link, h_res, h_post, u, backend=backend)

    return _step((x, phi, alpha, bias), fwd, grad)


def _graphed_setup(d: Dims, device: str):
    """``ours`` captured once as a CUDA graph (forward, backward and the grad resets): the same
    kernels replayed with no host work between them, so ours minus this is the launch and
    autograd overhead of the site (the kernels' own time is what this row shows)."""
    from bench.cases import cuda_graph

    return cuda_graph(_ours_setup(d, device, "triton"))


def _pinned_graph_setup(d: Dims, device: str):
    """``ours_graph`` with the kernels' tilings pinned (the deterministic mode), captured with
    the pins on; the process's setting is restored afterwards."""
    from megatron_ext.ops import mhc

    prev = mhc.pin_tilings(True)
    try:
        return _graphed_setup(d, device)
    finally:
        mhc.pin_tilings(prev)


def _einsum_setup(d: Dims, device: str):
    """The seed's formulation: fp32 mappings, then the stream mixes as einsums in the activation
    dtype (``bn,btnd->btd`` pre, ``bnm,btmd->btnd`` + post * f), per token here."""
    import torch

    from megatron_ext.ops.mhc.reference import mhc_mappings

    x, phi, alpha, bias, grad = _inputs(d, device)

    def fwd():
        h_pre, h_post, h_res = mhc_mappings(x.reshape(d.s * d.b, N * d.c), phi, alpha, bias, N)
        h_pre = h_pre.view(d.s, d.b, N).to(x.dtype)
        h_post = h_post.view(d.s, d.b, N).to(x.dtype)
        h_res = h_res.view(d.s, d.b, N, N).to(x.dtype)
        u = torch.einsum("sbn,sbnc->sbc", h_pre, x)
        return torch.einsum("sbnm,sbmc->sbnc", h_res, x) + h_post[..., None] * u[..., None, :]

    return _step((x, phi, alpha, bias), fwd, grad)


def _residual_setup(d: Dims, device: str):
    import torch

    x = torch.randn(d.s, d.b, d.c, device=device, dtype=torch.bfloat16, requires_grad=True)
    f = torch.randn(d.s, d.b, d.c, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(d.s, d.b, d.c, device=device, dtype=torch.bfloat16)
    return _step((x, f), lambda: x + f, grad)


def _anchor_setup(d: Dims, device: str):
    """Megatron-LM main's HyperConnectionModule(config, layer_number): forward(hidden [s, b, n*C])
    -> (aggregated, h_res, h_post[, residual]); fused_h_res_h_post_bda(...) -> [s, b, n*C]."""
    import importlib

    import torch

    from megatron_ext.compat import make_transformer_config

    hc = importlib.import_module(ANCHOR_MODULE)
    try:
        config = make_transformer_config(
            num_layers=1, hidden_size=d.c, num_attention_heads=16, bf16=True,
            params_dtype=torch.bfloat16, add_bias_linear=False, hidden_dropout=0.0,
            attention_dropout=0.0, mhc_sinkhorn_iterations=20, mhc_init_gating_factor=0.01,
            use_fused_mhc=False,
            # the switch and stream count were renamed on main; fields this megatron lacks drop
            enable_mhc_connections=True, mhc_num_residual_streams=N,
            enable_hyper_connections=True, num_residual_streams=N)
        module = hc.HyperConnectionModule(config, layer_number=1).to(device).train()
        # as Float16Module does: bf16 parameters except those marked keep_in_fp32 (main marks
        # the mapping parameters; older snapshots cast them and expect bf16 activations there)
        for p in module.parameters():
            if not getattr(p, "keep_in_fp32", False):
                p.data = p.data.to(torch.bfloat16)
    except Exception as err:  # the module's constructor follows Megatron main; say what broke
        raise RuntimeError(f"anchor {ANCHOR_MODULE}.HyperConnectionModule could not be built with "
                           f"this megatron ({err!r}); update _anchor_setup") from err
    params = list(module.parameters())
    x = torch.randn(d.s, d.b, N * d.c, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(d.s, d.b, N * d.c, device=device, dtype=torch.bfloat16)

    def fwd():
        out = module(x)
        aggregated, h_res, h_post = out[:3]
        residual = out[3] if len(out) > 3 else x
        return module.fused_h_res_h_post_bda(h_res, residual, h_post, (aggregated, None), 0.0,
                                             True, False)

    return _step([x, *params], fwd, grad)


@register
def mhc(small: bool = False, device: str = "cuda") -> Benchmark:
    d = SMALL if small else FULL
    nbytes, rbytes = site_bytes(d), residual_bytes(d)
    # --cpu smoke mode: no Triton driver on a CPU host, so "ours" resolves through "auto" there
    ours_backend = "triton" if device == "cuda" else "auto"
    cases = [
        Case(name="ours", label="ours: triton fused", role="ours", bound="memory", bytes=nbytes,
             setup=lambda: _ours_setup(d, device, ours_backend)),
    ]
    if device == "cuda":
        cases.append(Case(name="ours_graph", label="ours: triton fused, one CUDA graph",
                          role="ours", bound="memory", bytes=nbytes,
                          setup=lambda: _graphed_setup(d, device)))
        cases.append(Case(name="ours_graph_pinned",
                          label="ours: triton fused, one CUDA graph, pinned tilings (deterministic mode)",
                          role="ref", bound="memory", bytes=nbytes,
                          setup=lambda: _pinned_graph_setup(d, device)))
    cases += [
        Case(name="ref_torch", label="ref: torch reference (ours)", role="ref", bound="memory",
             bytes=nbytes, setup=lambda: _ours_setup(d, device, "torch")),
        Case(name="ref_einsum", label="ref: einsum seed reference", role="ref", bound="memory",
             bytes=nbytes, setup=lambda: _einsum_setup(d, device)),
        Case(name="ref_residual", label="ref: plain residual add", role="ref", bound="memory",
             bytes=rbytes, setup=lambda: _residual_setup(d, device)),
    ]
    note = ""
    if anchor_available():
        cases.append(Case(name="anchor", label="anchor: Megatron-LM HyperConnectionModule",
                          role="anchor", bound="memory", bytes=nbytes,
                          setup=lambda: _anchor_setup(d, device)))
    else:
        note = (f"; anchor skipped: {ANCHOR_MODULE} not in this megatron-core (put a Megatron-LM "
                f"main checkout on PYTHONPATH)")
    return Benchmark(
        name="mhc",
        description="mHC site fwd+bwd (mappings + pre + post/res, n=4): fused Triton vs torch" + note,
        shape=(f"streams[s={d.s}, b={d.b}, n={N}, C={d.c}] bf16, phi [{N * d.c}, {N * N + 2 * N}] "
               f"fp32, 20 Sinkhorn iters, identity branch, fwd+bwd"),
        cases=cases)
