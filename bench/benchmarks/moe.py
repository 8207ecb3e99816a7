"""``moe`` / ``moe_32k``: routed expert FFN (router + experts + weighted combine), fwd + bwd, bf16.

Shapes: ``moe`` T=8192 tokens, H=2048, F=1408 (per-expert FFN), E=64 experts, top-6, SwiGLU;
``moe_32k`` T=32768, E=128, top-8 (SonicMoE's shape family), same H and F. EP=1.

Every case routes the same way: ``logits = x @ W_r`` -> top-k of the logits -> softmax over the k
chosen (Megatron's default: ``moe_router_pre_softmax=False``, score function softmax), no aux loss,
no capacity (dropless). The timed call is forward + backward from a random ``[T, H]`` gradient
into x, the router weight and the expert weights.

anchor = Megatron-Core ``MoELayer`` with the local spec (``layer_specs.gpt.stock_moe_spec``:
         SequentialMLP, experts one by one), alltoall dispatcher, EP=1, load balancing "none"
         (the ratio column is against this row);
anchor = a straightforward torch pipeline: topk, argsort, index, ``grouped_mm``, activation,
         ``grouped_mm``, ``index_add`` (the figure the issue quotes: 9.9 ms at ``moe``);
ours   = ``megatron_ext.ops.moe.moe_ffn(backend="triton")`` and ``backend="grouped_mm"`` behind the
         bench's own router (the three lines above), and ``backend="te"`` where Transformer Engine
         is installed (row ``ours_te``; absent otherwise); ``ours_layer`` = our Megatron layer
         ``FusedMoELayer`` on the anchor's config (its fp32 router and routing function, the
         fused experts, the layer's glue): the row to set beside the Megatron anchor;
         ``ours_layer_ddp`` / ``ours_layer_ddp_hook`` = that layer inside Megatron's DDP with fp32
         gradient buffers (one training micro-batch per call), the experts' weight gradients
         added into ``main_grad`` by the weight-gradient kernel (the default) or by the DDP hook
         (``--no-moe-gradient-accumulation-fusion``);
ref    = the six Triton GEMM kernels of one fwd+bwd alone (up, down, dh, dx, dW1, dW2) on
         precomputed routing metadata: ``1 - ref ms / ours ms`` is the share of time outside the
         GEMMs (routing kernels, the d(h) row pass (activation backward, dprobs), combine
         kernels, router, allocations).

FLOPs (expert math only, 1 multiply-add = 2 FLOPs, N = T*k routed rows):
forward = GEMM 1 ``2*N*H*2F`` (gate + up) + GEMM 2 ``2*N*F*H`` = ``2*N*H*3F``;
backward = 2 x forward (an input grad and a weight grad per GEMM);
fwd + bwd = ``6 * T * k * H * 3F`` = 2.55 TFLOP at ``moe``. The router GEMM (``6*T*H*E``) is not
counted (0.25 % of it).

``--cpu`` (``small=True``): tiny shapes; the Triton and grouped_mm cases run through
backend="auto" (the torch reference on the CPU), the CUDA-only rows are left out.
"""

from __future__ import annotations

import dataclasses

from bench.cases import Benchmark, Case
from bench.registry import register


@dataclasses.dataclass(frozen=True)
class Dims:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    topk: int


SMALL = Dims(tokens=64, hidden=32, ffn=24, experts=4, topk=2)


def expert_flops(d: Dims) -> float:
    """fwd + bwd of the gated expert FFN: 6 * T*k * H * 3F (see the module docstring)."""
    return 6.0 * d.tokens * d.topk * d.hidden * 3 * d.ffn


def _params(d: Dims, device: str):
    import torch

    dt = torch.bfloat16
    x = torch.randn(d.tokens, d.hidden, device=device, dtype=dt, requires_grad=True)
    wr = (torch.randn(d.hidden, d.experts, device=device) * d.hidden ** -0.5).to(dt).requires_grad_()
    w1 = (torch.randn(d.experts, d.hidden, 2 * d.ffn, device=device) * d.hidden ** -0.5).to(dt)
    w2 = (torch.randn(d.experts, d.ffn, d.hidden, device=device) * d.ffn ** -0.5).to(dt)
    grad = torch.randn(d.tokens, d.hidden, device=device, dtype=dt)
    return x, wr, w1.requires_grad_(), w2.requires_grad_(), grad


def _route(x, wr, k):
    import torch

    vals, idx = (x @ wr).float().topk(k, dim=-1)
    return torch.softmax(vals, dim=-1), idx


def _zero(*ts):
    for t in ts:
        t.grad = None


def _ours_setup(d: Dims, device: str, backend: str, pregather=None):
    from megatron_ext.ops.moe import moe_ffn

    x, wr, w1, w2, grad = _params(d, device)

    def step():
        _zero(x, wr, w1, w2)
        probs, idx = _route(x, wr, d.topk)
        moe_ffn(x, probs, idx, w1, w2, "swiglu", backend=backend,
                pregather=pregather).backward(grad)

    return step


def _torch_pipeline_setup(d: Dims, device: str):
    import torch
    import torch.nn.functional as F

    from megatron_ext.ops.moe import _grouped_mm_fn

    gmm = _grouped_mm_fn()
    x, wr, w1, w2, grad = _params(d, device)

    def step():
        _zero(x, wr, w1, w2)
        probs, idx = _route(x, wr, d.topk)
        flat = idx.reshape(-1)
        order = torch.argsort(flat)
        tok = order // d.topk
        offs = torch.cumsum(torch.bincount(flat, minlength=d.experts), 0).to(torch.int32)
        gate, up = gmm(x[tok], w1, offs=offs).chunk(2, dim=-1)
        y = gmm(F.silu(gate) * up, w2, offs=offs)
        y = y * probs.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(x).index_add(0, tok, y)
        out.backward(grad)

    return step


def _gemms_only_setup(d: Dims, device: str):
    """The six expert GEMMs of one fwd + bwd on precomputed routing and buffers, as the default
    tiles run them (the weight gradients on the grouped GEMM lane where the config asks for it;
    with ``pregather`` on the sorted x / dout rows, gathered once outside the timed step)."""
    import torch

    from megatron_ext.ops.moe import triton_moe as tm

    x, wr, w1, w2, grad = _params(d, device)
    with torch.no_grad():
        probs, idx = _route(x, wr, d.topk)
    cfg = tm.default_config(x.dtype)
    r = tm.routing_metadata(idx, probs, d.experts, cfg.row_tiles)
    n, H, Fd = r.rows, d.hidden, d.ffn
    new = lambda *s: torch.empty(*s, device=device, dtype=x.dtype)  # noqa: E731
    a, h, y, da, h2, dxp = new(n, 2 * Fd), new(n, Fd), new(n, H), new(n, 2 * Fd), new(n, Fd), new(n, H)
    g = new(n, Fd)
    dpp = torch.empty(-(-Fd // cfg.dh.block_n), n, device=device)
    xd, w1d, w2d = x.detach(), w1.detach(), w2.detach()
    pre = cfg.pregather
    xs = tm.gather_rows(xd, r, cfg) if pre else None
    ds = tm.gather_rows(grad, r, cfg) if pre else None
    if cfg.split_dh:   # da, p*h once: the timed step runs the GEMMs only, not the row pass
        tm.launch_up(xs if pre else xd, w1d, a, h, r, "swiglu", cfg, sorted_rows=pre)
        tm.launch_dh_gemm(ds if pre else grad, w2d, g, r, cfg, sorted_rows=pre)
        tm.launch_act_bwd(g, a, da, h2, dpp[0], r, "swiglu", cfg)

    def step():
        tm.launch_up(xs if pre else xd, w1d, a, h, r, "swiglu", cfg, sorted_rows=pre)
        tm.launch_down(h, w2d, y, r, w2d.stride(), Fd, H, True, cfg.down, cfg)
        if cfg.split_dh:
            tm.launch_dh_gemm(ds if pre else grad, w2d, g, r, cfg, sorted_rows=pre)
        else:
            tm.launch_dh(grad, w2d, a, da, h2, dpp, r, "swiglu", cfg)
        tm.launch_down(da, w1d, dxp, r, (w1d.stride(0), w1d.stride(2), w1d.stride(1)), 2 * Fd, H,
                       False, cfg.dx, cfg)
        tm.weight_grads(xd, da, h2, grad, w1d, w2d, r, cfg, x_sorted=xs, dout_sorted=ds)

    return step


def megatron_moe_config(d: Dims, **overrides):
    """TransformerConfig of the Megatron anchor: local experts, alltoall, no aux loss, bf16
    (``overrides`` replace or add fields, e.g. ``expert_model_parallel_size``)."""
    import torch
    import torch.nn.functional as F

    from megatron_ext.compat import make_transformer_config

    fields = dict(
        num_layers=1, hidden_size=d.hidden, num_attention_heads=16 if d.hidden % 16 == 0 else 1,
        ffn_hidden_size=d.ffn, moe_ffn_hidden_size=d.ffn, num_moe_experts=d.experts,
        moe_router_topk=d.topk, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall", gated_linear_unit=True, activation_func=F.silu,
        bf16=True, params_dtype=torch.bfloat16, transformer_impl="local", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, moe_grouped_gemm=False)
    fields.update(overrides)
    return make_transformer_config(**fields)


def fused_moe_layer(d: Dims, lane: str, bf16: bool, **fields):
    """One :class:`FusedMoELayer` (layer 1 of 1) of shape ``d`` built the way ``megatron-ext train``
    builds it: the ``test`` preset with ``fields`` (TrainConfig names, e.g. ``moe_backend``,
    ``expert_model_parallel_size``) on top. Megatron's parallel state must exist already."""
    from megatron_ext.config import from_preset
    from megatron_ext.modules.moe import FusedMoELayer
    from megatron_ext.training.model import transformer_config

    heads = max(h for h in (16, 8, 4, 2, 1) if d.hidden % h == 0)
    cfg = from_preset("test", num_layers=1, hidden_size=d.hidden, num_attention_heads=heads,
                      num_experts=d.experts, moe_ffn_hidden_size=d.ffn, moe_router_topk=d.topk, **fields)
    layer = FusedMoELayer(transformer_config(cfg, lane, bf16))
    layer.set_layer_number(1)
    return layer


def _layer_step(build, d: Dims, device: str, ddp: bool = False, first: bool = False):
    """fwd + bwd of a Megatron MoE layer on ``[T, 1, H]`` bf16: ``build(config)`` makes the layer
    (after the world-size-1 model-parallel setup it needs) on the anchor's config. ``ddp``: the
    layer inside Megatron's ``DistributedDataParallel`` with fp32 gradient buffers, as Megatron
    trains bf16 models: each step is one more micro-batch whose weight gradients reach
    ``main_grad`` (through the DDP hook's add, or the layer's own fused accumulation).
    ``first``: each call is a training step's first micro-batch instead, its ``zero_grad_buffer``
    (the memset of every buffer) included."""
    import torch

    from bench.parallel import ensure_model_parallel

    ensure_model_parallel(cpu=device == "cpu")
    config = megatron_moe_config(d)
    layer = build(config).to(device=device, dtype=torch.bfloat16).train()
    params = list(layer.parameters())
    if ddp:
        from megatron.core.distributed import DistributedDataParallel

        from megatron_ext.compat import ddp_config

        layer = DistributedDataParallel(
            config, ddp_config(grad_reduce_in_fp32=True, overlap_grad_reduce=False), layer)
        layer.zero_grad_buffer()
    x = torch.randn(d.tokens, 1, d.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(d.tokens, 1, d.hidden, device=device, dtype=torch.bfloat16)

    def step():
        _zero(x, *params)
        if first:
            layer.zero_grad_buffer()
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return step


def _megatron_setup(d: Dims, device: str):
    def build(config):
        from megatron.core.transformer.spec_utils import build_module

        from layer_specs.gpt import stock_moe_spec

        return build_module(stock_moe_spec(), config=config)

    return _layer_step(build, d, device)


def _ours_layer_setup(d: Dims, device: str, deterministic: bool = False, ddp: bool = False,
                      fusion: bool = True, first: bool = False):
    """Our Megatron layer (``FusedMoELayer``, what ``--spec`` builds) on the anchor's config:
    fp32 router logits and routing (``route``), the fused experts, the layer's glue;
    ``deterministic``: ``--moe-deterministic`` (batch-invariant GEMMs); ``ddp``: under Megatron's
    DDP (see :func:`_layer_step`), with the experts' gradient-accumulation fusion on or off;
    ``first``: each call a step's first micro-batch."""
    def build(config):
        from megatron_ext.config import MoEConfig
        from megatron_ext.modules.moe import FusedMoELayer
        from megatron_ext.observability.moe_stats import STATE

        STATE.reset()   # the per-step monitor sums each layer's load; a new shape starts it afresh
        config.moe = MoEConfig(deterministic=deterministic, gradient_accumulation_fusion=fusion)
        return FusedMoELayer(config)

    return _layer_step(build, d, device, ddp=ddp, first=first)


def _benchmark(name: str, full: Dims, small: bool, device: str) -> Benchmark:
    d = SMALL if small else full
    flops = expert_flops(d)
    cpu = device == "cpu"
    cases = [Case(name="megatron", label="anchor: megatron MoELayer (SequentialMLP, alltoall)",
                  role="anchor", setup=lambda: _megatron_setup(d, device), flops=flops)]
    if not cpu:
        cases.append(Case(name="torch_pipeline",
                          label="anchor: torch topk+argsort+grouped_mm+index_add", role="anchor",
                          setup=lambda: _torch_pipeline_setup(d, device), flops=flops))
    for backend in ("triton", "grouped_mm"):
        cases.append(Case(name=f"ours_{backend}",
                          label=f"ours: moe_ffn backend={backend}" + (" (cpu: auto)" if cpu else ""),
                          role="ours", setup=lambda b=backend: _ours_setup(d, device,
                                                                           "auto" if cpu else b),
                          flops=flops))
    if not cpu:
        from megatron_ext.ops.moe import te_grouped

        if te_grouped.unavailable() is None:   # Transformer Engine installed: its grouped GEMM lane
            cases.append(Case(name="ours_te", label="ours: moe_ffn backend=te (TE grouped GEMM)",
                              role="ours", setup=lambda: _ours_setup(d, device, "te"), flops=flops))
    cases.append(Case(name="ours_layer",
                      label="ours: FusedMoELayer (Megatron layer: fp32 router + fused experts)",
                      role="ours", setup=lambda: _ours_layer_setup(d, device), flops=flops))
    cases.append(Case(name="ours_layer_det",
                      label="ours: FusedMoELayer, --moe-deterministic (bitwise repeatable, batch-invariant)",
                      role="ours", setup=lambda: _ours_layer_setup(d, device, deterministic=True),
                      flops=flops))
    if not cpu:
        # Megatron's DDP with fp32 gradient buffers around the layer: one more micro-batch of a
        # step, or a step's first one (zero_grad_buffer included; the fused lane then stores the
        # experts' gradients into the zeroed buffers instead of adding to them)
        under = "ours: FusedMoELayer under Megatron DDP"
        hook = "--no-moe-gradient-accumulation-fusion (the DDP hook adds)"
        first_mb = "a step's first micro-batch"
        for case_name, label, first, fusion in (
                ("ours_layer_ddp", f"{under} (fp32 main_grad; expert grads added in the "
                                   "weight-gradient kernel)", False, True),
                ("ours_layer_ddp_hook", f"{under}, {hook}", False, False),
                ("ours_layer_ddp_first", f"{under}, {first_mb} (zero_grad_buffer + fwd + bwd; "
                                         "expert grads stored into the zeroed buffer)", True, True),
                ("ours_layer_ddp_first_hook", f"{under}, {first_mb}, {hook}", True, False)):
            cases.append(Case(name=case_name, label=label, role="ours", flops=flops,
                              setup=lambda first=first, fusion=fusion: _ours_layer_setup(
                                  d, device, ddp=True, fusion=fusion, first=first)))
        # the memory-saving lane: rows gathered inside the GEMMs, x saved instead of its k copies
        cases.append(Case(name="ours_triton_no_pregather",
                          label="ours: moe_ffn backend=triton, --no-moe-pregather", role="ours",
                          setup=lambda: _ours_setup(d, device, "triton", pregather=False),
                          flops=flops))
        cases.append(Case(name="triton_gemms",
                          label="ref: the 6 expert GEMMs alone (as moe_ffn runs them)", role="ref",
                          setup=lambda: _gemms_only_setup(d, device), flops=flops))
    return Benchmark(
        name=name,
        description=("routed expert FFN fwd+bwd incl. router; TFLOP/s over expert math "
                     "6*T*k*H*3F; ratio vs the Megatron SequentialMLP layer"
                     + ("; CUDA-only rows skipped on CPU" if cpu else "")),
        shape=(f"x[T={d.tokens}, H={d.hidden}] bf16, E={d.experts} experts of F={d.ffn} SwiGLU, "
               f"top-{d.topk} (topk -> softmax, no aux loss, dropless), EP=1, fwd+bwd"),
        cases=cases)


@register
def moe(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("moe", Dims(8192, 2048, 1408, 64, 6), small, device)


@register
def moe_32k(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("moe_32k", Dims(32768, 2048, 1408, 128, 8), small, device)


def breakdown() -> str:
    """Per-kernel times of the Triton path at both shapes (``triton.testing.do_bench`` medians),
    for tuning and for the docs: ``python -c "from bench.benchmarks.moe import breakdown;
    print(breakdown())"`` on a GPU."""
    lines = ["| shape | kernel | ms | TFLOP/s |", "|---|---|---:|---:|"]
    for name, d in (("moe", Dims(8192, 2048, 1408, 64, 6)),
                    ("moe_32k", Dims(32768, 2048, 1408, 128, 8))):
        lines += _breakdown_rows(name, d)
    return "\n".join(lines)


def _breakdown_rows(name: str, d: Dims):
    import torch
    import triton

    from megatron_ext.ops.moe import triton_moe as tm

    torch.manual_seed(0)
    x, wr, w1, w2, grad = _params(d, "cuda")
    with torch.no_grad():
        probs, idx = _route(x, wr, d.topk)
    cfg = tm.default_config(x.dtype)
    r = tm.routing_metadata(idx, probs, d.experts, cfg.row_tiles)
    n, H, Fd = r.rows, d.hidden, d.ffn
    new = lambda *s: torch.empty(*s, device="cuda", dtype=x.dtype)  # noqa: E731
    a, h, y, da, hp, dxp = (new(n, 2 * Fd), new(n, Fd), new(n, H), new(n, 2 * Fd), new(n, Fd),
                            new(n, H))
    g = new(n, Fd)
    out = new(d.tokens, H)
    dpp = torch.empty(-(-Fd // cfg.dh.block_n), n, device="cuda")
    tm.launch_up(x.detach(), w1.detach(), a, h, r, "swiglu", cfg)
    xd, w1d, w2d = x.detach(), w1.detach(), w2.detach()
    w1t = (w1d.stride(0), w1d.stride(2), w1d.stride(1))
    gemm = 2.0 * n * H * Fd
    pre = cfg.pregather   # x / dout rows gathered once (their own rows below), then plain GEMMs
    xs = tm.gather_rows(xd, r, cfg) if pre else None
    ds = tm.gather_rows(grad, r, cfg) if pre else None
    kernels = [
        ("routing metadata (counting sort, tables)",
         lambda: tm.routing_metadata(idx, probs, d.experts, cfg.row_tiles), None),
    ]
    if pre:
        kernels += [("pregather: x rows in sorted order",
                     lambda: tm.gather_rows(xd, r, cfg), None),
                    ("up: x_sorted @ W1 + swiglu",
                     lambda: tm.launch_up(xs, w1d, a, h, r, "swiglu", cfg, sorted_rows=True),
                     2 * gemm)]
    else:
        kernels.append(("up: gather x @ W1 + swiglu",
                        lambda: tm.launch_up(xd, w1d, a, h, r, "swiglu", cfg), 2 * gemm))
    kernels += [
        ("down: p * h @ W2 -> pair rows",
         lambda: tm.launch_down(h, w2d, y, r, w2d.stride(), Fd, H, True, cfg.down, cfg), gemm),
        ("combine over k", lambda: tm.launch_combine(y, out, d.topk, cfg), None),
    ]
    if cfg.split_dh and pre:
        kernels += [
            ("pregather: dout rows in sorted order",
             lambda: tm.gather_rows(grad, r, cfg), None),
            ("dh: dout_sorted @ W2^T -> g",
             lambda: tm.launch_dh_gemm(ds, w2d, g, r, cfg, sorted_rows=True), gemm),
            ("dh row pass: act bwd, p h, dprobs",
             lambda: tm.launch_act_bwd(g, a, da, hp, dpp[0], r, "swiglu", cfg), None),
        ]
    elif cfg.split_dh:
        kernels += [
            ("dh: gather dout @ W2^T -> g", lambda: tm.launch_dh_gemm(grad, w2d, g, r, cfg), gemm),
            ("dh row pass: act bwd, p h, dprobs",
             lambda: tm.launch_act_bwd(g, a, da, hp, dpp[0], r, "swiglu", cfg), None),
        ]
    else:
        kernels.append(("dh: gather dout @ W2^T + act bwd",
                        lambda: tm.launch_dh(grad, w2d, a, da, hp, dpp, r, "swiglu", cfg), gemm))
    kernels += [
        ("dx: da @ W1^T -> pair rows",
         lambda: tm.launch_down(da, w1d, dxp, r, w1t, 2 * Fd, H, False, cfg.dx, cfg), 2 * gemm),
    ]
    lane = "torch grouped GEMM on gathered rows" if cfg.wgrad_grouped_mm else "Triton kernel"
    if pre:
        lane += ", pregathered"
    kernels += [
        (f"dW1: x^T @ da (jagged; {lane})",
         lambda: tm.weight_grads(xd, da, hp, grad, w1d, w2d, r, cfg, (True, False),
                                 x_sorted=xs, dout_sorted=ds), 2 * gemm),
        (f"dW2: (p h)^T @ dout (jagged; {lane})",
         lambda: tm.weight_grads(xd, da, hp, grad, w1d, w2d, r, cfg, (False, True),
                                 x_sorted=xs, dout_sorted=ds), gemm),
    ]
    # under Megatron's DDP (fp32 gradient buffers): the grouped GEMM's bf16 dW then the hook's
    # main_grad += grad, against the kernel adding into main_grad itself (wgrad_accum)
    bufs = [torch.zeros(w.shape, device="cuda") for w in (w1d, w2d)]

    def unfused():
        for buf, gw in zip(bufs, tm.weight_grads(xd, da, hp, grad, w1d, w2d, r, cfg,
                                                 x_sorted=xs, dout_sorted=ds)):
            buf.add_(gw)

    kernels += [
        (f"dW1 + dW2 ({lane}) + DDP hook's fp32 main_grad add", unfused, 3 * gemm),
        ("dW1 + dW2 added into fp32 main_grad in the kernel (wgrad_accum)",
         lambda: tm.weight_grads(xd, da, hp, grad, w1d, w2d, r, cfg, x_sorted=xs,
                                 dout_sorted=ds, accumulate_into=tuple(bufs)), 3 * gemm),
    ]
    rows = []
    for label, fn, flops in kernels:
        ms = triton.testing.do_bench(fn, warmup=50, rep=200)
        tf = f"{flops / ms / 1e9:.0f}" if flops else ""
        rows.append(f"| {name} | {label} | {ms:.3f} | {tf} |")
    return rows
