"""GQLA benchmarks (docs/gqla.md): decode per path, and the training layer vs Megatron's MLA.

``gqla_decode_{8k,32k}_g{4,8}``: one decode step of one attention layer, batch 64, context T (8k or
32k tokens already cached), H=32 query heads, hidden 4096, d_nope=128, d_rope=64, d_v=128, r_kv=512,
bf16. Cases (the full step: projections of the new token, cache write, attention, output projection):

ours   "gqa"    = ``GQLAttention.decode_step`` on a path-"gqa" cache (G*(d_nope+d_v)+d_rope per token),
                  attention in the Triton split-KV kernel (keys [k_nope_g | k^R], values v_g);
ours   "absorb" = the same weights on a path-"absorb" cache (r_kv+d_rope per token), W^UK/W^UV absorbed,
                  attention = the kernel's MQA over keys [c | k^R] with values c (latent read once);
anchor          = plain GQA with the same G, head dim 128: qkv projection, cache write, SDPA over the
                  full K/V cache [b, G, T, 128] (``enable_gqa``), output projection;
ref    "*_torch" = the two paths with the torch attention (scores and softmax through HBM).

``bytes`` = cache bytes read + weight bytes (the HBM traffic of a step), ``flops`` = the attention
matmuls (scores + values) plus the projections, so the table's GB/s and FLOP/s place each path on
the roofline (H100 ridge ~295 FLOP/byte for bf16).

``gqla_attn_{8k_g4,32k_g8}``: the attention alone (no projections, no cache write): the kernel on
each path's cache vs SDPA on the plain GQA cache; bytes = the cache bytes read.

``gqla_train``: fwd+bwd of the attention module alone at s=4096, b=1, same dims, G=8: ours = GQLA
(backend "auto": dense causal GQA attention through SDPA, K/V repeated per head), anchor =
Megatron's ``MLASelfAttention`` from its local spec with this project's SDPA core attention
(Megatron's local ``DotProductAttention`` rejects MLA's ``k_channels`` argument).

``--cpu`` runs tiny shapes (the torch paths) to check the plumbing.
"""

from __future__ import annotations

import dataclasses

from bench.cases import Benchmark, Case
from bench.registry import register


@dataclasses.dataclass(frozen=True)
class Dims:
    T: int
    G: int
    b: int = 64
    H: int = 32
    hidden: int = 4096
    dn: int = 128
    dr: int = 64
    dv: int = 128
    r: int = 512
    gqa_head: int = 128


def small_dims(G: int) -> Dims:
    return Dims(T=64, G=min(G, 4), b=2, H=4, hidden=64, dn=16, dr=8, dv=16, r=32, gqa_head=16)


def _gqla_module(d: Dims, device: str, backend: str = "auto"):
    import torch

    from bench.parallel import ensure_model_parallel
    from megatron_ext.compat import make_transformer_config
    from megatron_ext.config import GQLAConfig
    from megatron_ext.modules.gqla import GQLASelfAttentionSubmodules, GQLAttention
    from megatron_ext.modules.norm import Norm

    ensure_model_parallel(cpu=device == "cpu")
    cfg = make_transformer_config(
        num_layers=1, hidden_size=d.hidden, num_attention_heads=d.H, num_query_groups=d.G,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=True, params_dtype=torch.bfloat16, transformer_impl="local", use_cpu_initialization=True,
        gradient_accumulation_fusion=False)
    cfg.gqla = GQLAConfig(num_query_groups=d.G, kv_lora_rank=d.r, qk_head_dim=d.dn,
                          qk_pos_emb_head_dim=d.dr, v_head_dim=d.dv,
                          backend=backend)
    m = GQLAttention(cfg, GQLASelfAttentionSubmodules(q_layernorm=Norm, kv_layernorm=Norm))
    return m.to(device=device, dtype=torch.bfloat16)


def _weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _gqla_decode_setup(d: Dims, device: str, path: str, backend: str = "auto"):
    import torch

    # "auto": the Triton split-KV kernel on CUDA (the torch path on the CPU plumbing run)
    m = _gqla_module(d, device, backend).eval()
    cache = m.init_cache(d.b, d.T, path=path)
    for t in (cache.k_rope, cache.latent, cache.k_nope, cache.v):
        if t is not None:
            t.normal_()
    x = torch.randn(1, d.b, d.hidden, device=device, dtype=torch.bfloat16)

    def step():
        cache.length = d.T - 1  # rewrite the last slot each call: a step at context T
        return m.decode_step(x, cache, d.T - 1)

    return step


def _plain_gqa_setup(d: Dims, device: str):
    import torch
    import torch.nn.functional as F

    hd, G, H = d.gqa_head, d.G, d.H
    bf = dict(device=device, dtype=torch.bfloat16)
    w_qkv = torch.randn((H + 2 * G) * hd, d.hidden, **bf) / d.hidden ** 0.5
    w_o = torch.randn(d.hidden, H * hd, **bf) / (H * hd) ** 0.5
    k_cache = torch.randn(d.b, G, d.T, hd, **bf)
    v_cache = torch.randn(d.b, G, d.T, hd, **bf)
    x = torch.randn(d.b, d.hidden, **bf)

    @torch.no_grad()
    def step():
        qkv = (x @ w_qkv.T).view(d.b, H + 2 * G, hd)
        q, k, v = qkv[:, :H], qkv[:, H:H + G], qkv[:, H + G:]
        k_cache[:, :, -1] = k
        v_cache[:, :, -1] = v
        out = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, enable_gqa=True)
        return out.reshape(d.b, H * hd) @ w_o.T

    return step


def decode_costs(d: Dims):
    """``{case: (flops, bytes)}`` of one decode step (bf16: 2 bytes a value)."""
    b, T, H, G = d.b, d.T, d.H, d.G
    proj_w = d.hidden * (H * (d.dn + d.dr) + d.r + d.dr) + d.r * G * (d.dn + d.dv) + H * d.dv * d.hidden
    proj_f = 2 * b * proj_w
    gqa_bytes = 2 * (b * T * (G * (d.dn + d.dv) + d.dr) + proj_w)
    gqa_flops = proj_f + 2 * b * H * T * (d.dn + d.dr + d.dv)
    abs_bytes = 2 * (b * T * (d.r + d.dr) + proj_w)
    abs_flops = proj_f + 2 * b * H * T * (d.r + d.dr + d.r) + 2 * b * H * (d.dn + d.dv) * d.r
    plain_w = d.hidden * (H + 2 * G) * d.gqa_head + H * d.gqa_head * d.hidden
    plain_bytes = 2 * (b * T * 2 * G * d.gqa_head + plain_w)
    plain_flops = 2 * b * plain_w + 2 * b * H * T * 2 * d.gqa_head
    return {"gqa": (gqa_flops, gqa_bytes), "absorb": (abs_flops, abs_bytes), "plain": (plain_flops, plain_bytes)}


def _decode_benchmark(name: str, T: int, G: int, small: bool, device: str) -> Benchmark:
    d = small_dims(G) if small else Dims(T=T, G=G)
    costs = decode_costs(d)
    intensity = {k: f / by for k, (f, by) in costs.items()}
    cases = [
        Case(name="gqa", label=f"ours: GQLA decode, GQA path ({intensity['gqa']:.0f} FLOP/B)", role="ours",
             setup=lambda: _gqla_decode_setup(d, device, "gqa"), flops=costs["gqa"][0],
             bytes=costs["gqa"][1], bound="memory"),
        Case(name="absorb", label=f"ours: GQLA decode, absorb path ({intensity['absorb']:.0f} FLOP/B)",
             role="ours", setup=lambda: _gqla_decode_setup(d, device, "absorb"), flops=costs["absorb"][0],
             bytes=costs["absorb"][1], bound="memory"),
        Case(name="plain_gqa", label=f"anchor: plain GQA G={d.G}, SDPA ({intensity['plain']:.0f} FLOP/B)",
             role="anchor", setup=lambda: _plain_gqa_setup(d, device), flops=costs["plain"][0],
             bytes=costs["plain"][1], bound="memory"),
        Case(name="gqa_torch", label="ref: GQA path, torch attention (no kernel)", role="ref",
             setup=lambda: _gqla_decode_setup(d, device, "gqa", "torch"), flops=costs["gqa"][0],
             bytes=costs["gqa"][1], bound="memory"),
        Case(name="absorb_torch", label="ref: absorb path, torch attention (no kernel)", role="ref",
             setup=lambda: _gqla_decode_setup(d, device, "absorb", "torch"), flops=costs["absorb"][0],
             bytes=costs["absorb"][1], bound="memory"),
    ]
    return Benchmark(
        name=name,
        description=("one decode step of one attention layer (projections + cache write + attention + "
                     "output projection); bytes = cache read + weights; tokens/s = b / step time"),
        shape=(f"b={d.b}, context T={d.T}, H={d.H}, G={d.G}, hidden {d.hidden}, d_nope={d.dn}, "
               f"d_rope={d.dr}, d_v={d.dv}, r_kv={d.r}, bf16"),
        cases=cases)


@register
def gqla_decode_8k_g4(small: bool = False, device: str = "cuda") -> Benchmark:
    return _decode_benchmark("gqla_decode_8k_g4", 8192, 4, small, device)


@register
def gqla_decode_8k_g8(small: bool = False, device: str = "cuda") -> Benchmark:
    return _decode_benchmark("gqla_decode_8k_g8", 8192, 8, small, device)


@register
def gqla_decode_32k_g4(small: bool = False, device: str = "cuda") -> Benchmark:
    return _decode_benchmark("gqla_decode_32k_g4", 32768, 4, small, device)


@register
def gqla_decode_32k_g8(small: bool = False, device: str = "cuda") -> Benchmark:
    return _decode_benchmark("gqla_decode_32k_g8", 32768, 8, small, device)


# ------------------------------------------------------------------------------------------------
# attention alone: the split-KV kernel on each path's cache vs SDPA on the plain GQA cache


def _attn_setup(d: Dims, device: str, path: str):
    import torch
    import torch.nn.functional as F

    bf = dict(device=device, dtype=torch.bfloat16)
    b, T, H, G = d.b, d.T, d.H, d.G
    k_rope = torch.randn(b, 1, T, d.dr, **bf)
    q_rope = torch.randn(b, H, d.dr, **bf)
    scale = 1.0 / (d.dn + d.dr) ** 0.5
    if path == "plain":
        q = torch.randn(b, H, 1, d.gqa_head, **bf)
        k, v = (torch.randn(b, G, T, d.gqa_head, **bf) for _ in range(2))
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    from megatron_ext.ops.sparse_attention import triton_decode

    # --cpu: the kernel's torch spec (the plumbing check has no kernel to time)
    decode_attention = (triton_decode.decode_attention if device == "cuda"
                        else triton_decode.decode_attention_reference)
    if path == "gqa":
        q = torch.randn(b, H, d.dn, **bf)
        k_nope, v = torch.randn(b, G, T, d.dn, **bf), torch.randn(b, G, T, d.dv, **bf)
        return lambda: decode_attention(q, k_nope, v, q_rope=q_rope, k_rope=k_rope, softmax_scale=scale)
    q = torch.randn(b, H, d.r, **bf)
    latent = torch.randn(b, 1, T, d.r, **bf)
    return lambda: decode_attention(q, latent, None, q_rope=q_rope, k_rope=k_rope, softmax_scale=scale)


def _attn_benchmark(name: str, T: int, G: int, small: bool, device: str) -> Benchmark:
    d = small_dims(G) if small else Dims(T=T, G=G)
    b, H, T, G = d.b, d.H, d.T, d.G
    gqa_bytes = 2.0 * b * T * (G * (d.dn + d.dv) + d.dr)
    abs_bytes = 2.0 * b * T * (d.r + d.dr)
    plain_bytes = 2.0 * b * T * G * 2 * d.gqa_head
    return Benchmark(
        name=name,
        description="attention of one decode step over the cache (no projections); bytes = cache read",
        shape=f"b={b}, context T={T}, H={H}, G={G}, d_nope={d.dn}, d_rope={d.dr}, d_v={d.dv}, r_kv={d.r}, bf16",
        cases=[
            Case(name="absorb", label="ours: split-KV kernel, absorb cache (MQA over [c | k^R])", role="ours",
                 setup=lambda: _attn_setup(d, device, "absorb"), flops=2.0 * b * H * T * (2 * d.r + d.dr),
                 bytes=abs_bytes, bound="memory"),
            Case(name="gqa", label="ours: split-KV kernel, GQA cache", role="ours",
                 setup=lambda: _attn_setup(d, device, "gqa"), flops=2.0 * b * H * T * (d.dn + d.dr + d.dv),
                 bytes=gqa_bytes, bound="memory"),
            Case(name="plain_gqa", label=f"anchor: SDPA, plain GQA cache G={G}, d=128", role="anchor",
                 setup=lambda: _attn_setup(d, device, "plain"), flops=2.0 * b * H * T * 2 * d.gqa_head,
                 bytes=plain_bytes, bound="memory"),
        ])


@register
def gqla_attn_8k_g4(small: bool = False, device: str = "cuda") -> Benchmark:
    return _attn_benchmark("gqla_attn_8k_g4", 8192, 4, small, device)


@register
def gqla_attn_32k_g8(small: bool = False, device: str = "cuda") -> Benchmark:
    return _attn_benchmark("gqla_attn_32k_g8", 32768, 8, small, device)


# ------------------------------------------------------------------------------------------------
# training: the attention module fwd+bwd, GQLA vs Megatron's MLA


def _train_step(module, s: int, b: int, hidden: int, device: str, **fwd):
    import torch

    params = list(module.parameters())
    x = torch.randn(s, b, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(s, b, hidden, device=device, dtype=torch.bfloat16)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x, attention_mask=None, **fwd)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return step


def _mla_setup(d: Dims, s: int, device: str):
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from bench.parallel import ensure_model_parallel
    from megatron_ext.compat import make_transformer_config

    ensure_model_parallel(cpu=device == "cpu")
    cfg = make_transformer_config(
        MLATransformerConfig, num_layers=1, hidden_size=d.hidden, num_attention_heads=d.H,
        q_lora_rank=None, kv_lora_rank=d.r, qk_head_dim=d.dn, qk_pos_emb_head_dim=d.dr, v_head_dim=d.dv,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=True, params_dtype=torch.bfloat16, transformer_impl="local", use_cpu_initialization=True,
        rope_type="rope", apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, multi_latent_attention=True)
    from megatron_ext.modules.core_attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(multi_latent_attention=True).submodules.self_attention
    # Megatron's local DotProductAttention takes no k_channels/v_channels, which MLA passes (0.16.1
    # and 0.19.2), so the local MLA spec cannot be built; SDPA core attention takes d_qk != d_v.
    spec.submodules.core_attention = SDPACoreAttention
    mla = build_module(spec, config=cfg, layer_number=1).to(device=device, dtype=torch.bfloat16).train()
    return _train_step(mla, s, 1, d.hidden, device)


def _gqla_train_setup(d: Dims, s: int, device: str):
    # backend "auto": dense causal GQLA runs SDPA (the window kernel only with a window / sinks)
    return _train_step(_gqla_module(d, device, "auto").train(), s, 1, d.hidden, device)


@register
def gqla_train(small: bool = False, device: str = "cuda") -> Benchmark:
    d = small_dims(8) if small else Dims(T=0, G=8, b=1)
    s = 64 if small else 4096
    pairs = s * (s + 1) // 2
    attn = 3.5 * 2 * d.H * pairs * (d.dn + d.dr + d.dv)  # fwd scores + values, x3.5 for fwd+bwd
    proj = 3 * 2 * s * (d.hidden * (d.H * (d.dn + d.dr) + d.r + d.dr) + d.r * d.H * (d.dn + d.dv)
                        + d.H * d.dv * d.hidden)  # MLA's up-projection size; GQLA's is G/H of it
    return Benchmark(
        name="gqla_train",
        description=("attention module fwd+bwd: GQLA (G groups, sparse-attention op) vs Megatron "
                     "MLASelfAttention (local spec); FLOPs counted at MLA's sizes"),
        shape=(f"x[s={s}, b=1, h={d.hidden}] bf16; H={d.H}, G={d.G}, d_nope={d.dn}, d_rope={d.dr}, "
               f"d_v={d.dv}, r_kv={d.r}, causal"),
        cases=[
            Case(name="gqla", label=f"ours: GQLA G={d.G}", role="ours",
                 setup=lambda: _gqla_train_setup(d, s, device), flops=attn + proj),
            Case(name="mla", label="anchor: Megatron MLASelfAttention (local spec, SDPA core)", role="anchor",
                 setup=lambda: _mla_setup(d, s, device), flops=attn + proj),
        ])
