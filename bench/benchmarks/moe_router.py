"""``moe_router`` / ``moe_router_dsv3`` / ``moe_router_sqrtsoftplus``: the router's selection and
gates, forward + backward.

The timed call is ``route()`` on fp32 logits ``[T, E]`` (training, no aux loss, dropless) and the
backward of ``sum(probs * w)`` into the logits: everything of the router after its GEMM.

Shapes: ``moe_router`` T=8192 tokens, E=64, top-6, top-k then softmax (the ``moe`` benchmark's
router); ``moe_router_dsv3`` T=8192, E=256, top-8, DeepSeek-V3's router (sigmoid scores, expert
bias for selection, 8 groups of which the top 4 by the sum of their top-2 scores, gates normalised
over the k and scaled by 2.5); ``moe_router_sqrtsoftplus`` the same router with Megatron 0.19's
``sqrt(softplus(l))`` scores in place of the sigmoid.

anchor = ``route(backend="torch")``: the torch expressions of ``megatron_ext.ops.moe.routing``
         (softmax / sigmoid, ``torch.topk``, group scores, gather, normalisation) and their
         autograd backward, replayed as one CUDA graph;
ours   = ``route(backend="triton")``: the fused top-k gate (``triton_router``), one kernel each
         way, and the same counts, replayed as one CUDA graph;
ref    = the same two steps called eagerly from Python. ``route()`` forward + backward is a few
         dozen small launches and its Python, about 1 ms of host time per call against 40-110 us
         of kernels (H100), so the eager rows time the host; the graph rows time the kernels. A
         step that cannot be captured (a host synchronisation) is reported as skipped.

Bytes (memory-bound): the logits read in forward and backward and their gradient written,
``3 * T * E * 4``; the ``[T, k]`` tensors are small. FLOPs are not meaningful here.

``--cpu`` (``small=True``): tiny shapes, the torch lane only (the fused gate is a CUDA kernel).
"""

from __future__ import annotations

import dataclasses

from bench.cases import Benchmark, Case
from bench.registry import register


@dataclasses.dataclass(frozen=True)
class RouterDims:
    tokens: int
    experts: int
    topk: int
    kw: tuple   # extra RouterConfig fields


SOFTMAX = RouterDims(8192, 64, 6, ())
DSV3 = RouterDims(8192, 256, 8, (("score_function", "sigmoid"), ("enable_expert_bias", True),
                                 ("topk_scaling_factor", 2.5), ("num_groups", 8),
                                 ("group_topk", 4)))

SQRTSOFTPLUS = dataclasses.replace(DSV3, kw=(("score_function", "sqrtsoftplus"),) + DSV3.kw[1:])


def _setup(d: RouterDims, device: str, backend: str):
    import torch

    from megatron_ext.ops.moe.routing import RouterConfig, route

    cfg = RouterConfig(num_experts=d.experts, topk=d.topk, **dict(d.kw)).validate()
    logits = torch.randn(d.tokens, d.experts, device=device, requires_grad=True)
    bias = torch.randn(d.experts, device=device) * 0.01 if cfg.enable_expert_bias else None
    w = torch.randn(d.tokens, d.topk, device=device)

    def step():
        logits.grad = None
        r = route(logits, cfg, training=True, expert_bias=bias, backend=backend)
        (r.probs * w).sum().backward()

    return step


def _benchmark(name: str, full: RouterDims, what: str, small: bool, device: str) -> Benchmark:
    d = dataclasses.replace(full, tokens=64) if small else full
    nbytes = 3.0 * d.tokens * d.experts * 4
    from bench.cases import cuda_graph

    def case(name, label, role, backend, graph):
        build = (lambda: cuda_graph(_setup(d, device, backend))) if graph else (lambda: _setup(d, device, backend))
        return Case(name=name, label=label, role=role, setup=build, bytes=nbytes, bound="memory")

    if device == "cpu":
        cases = [case("torch", "anchor: route(backend='torch'), torch expressions", "anchor", "torch", False)]
    else:
        cases = [
            case("torch_graph", "anchor: route(backend='torch'), torch expressions, one CUDA graph", "anchor",
                 "torch", True),
            case("fused_graph", "ours: route(backend='triton'), fused top-k gate, one CUDA graph", "ours",
                 "triton", True),
            case("torch", "ref: route(backend='torch') called eagerly (host-bound)", "ref", "torch", False),
            case("fused", "ref: route(backend='triton') called eagerly (host-bound)", "ref", "triton", False),
        ]
    return Benchmark(
        name=name,
        description=("router selection + gates fwd+bwd after the router GEMM; GB/s over the "
                     "logits read twice and their gradient written"
                     + ("; the fused gate is CUDA-only" if device == "cpu" else "")),
        shape=f"logits[T={d.tokens}, E={d.experts}] fp32, top-{d.topk}, {what}",
        cases=cases)


@register
def moe_router(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("moe_router", SOFTMAX, "top-k then softmax", small, device)


@register
def moe_router_dsv3(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("moe_router_dsv3", DSV3, "DeepSeek-V3: sigmoid + bias, 8 groups / top-4, "
                      "normalised, x2.5", small, device)


@register
def moe_router_sqrtsoftplus(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("moe_router_sqrtsoftplus", SQRTSOFTPLUS, "sqrt(softplus) + bias, 8 groups / "
                      "top-4, normalised, x2.5", small, device)
