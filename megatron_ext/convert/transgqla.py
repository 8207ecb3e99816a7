"""TransGQLA: convert a trained GQA model's attention to GQLA without retraining.

After TransMLA (arXiv 2502.07864) and the GQLA paper (arXiv 2605.15250, "TransGQLA"): a GQA layer
with ``Gs`` KV heads of dim ``d`` becomes a GQLA layer with ``G`` groups and latent rank ``r_kv``.

1. Per target group ``g`` the no-rope key/value blocks are the source K/V heads its query heads read,
   side by side (``m = max(1, Gs / G)`` of them, so ``d_nope = d_v = m * d``); a query head puts its
   source query in the slot of its own source KV head and zeros elsewhere, and the output projection
   reads the same slot. This is exact: the scores and values of every head are unchanged.
2. The stack ``B = [W^UK_0; W^UV_0; ...; W^UK_{G-1}; W^UV_{G-1}]  [G (d_nope + d_v), h]`` is factored
   by a truncated SVD, ``B ~= (U_r S_r) V_r^T``: ``W_up = U_r S_r``, ``W_DKV = V_r^T``. By
   Eckart-Young the relative error ``||B - W_up W_DKV||_F / ||B||_F`` is the smallest any rank-r
   factorisation reaches, falls as ``r_kv`` grows and is 0 at full rank.
3. RoPE. A GQA key is rotary in all ``d`` dims, GQLA has one rope key shared by every head. RoPE
   rotates each frequency pair ``(i, i + d/2)`` by the same angle in every KV head, so an orthogonal
   mix of the heads' pair-``i`` projections commutes with it (TransMLA's RoRoPE observation). Per pair
   we take the principal direction ``u`` over the ``Gs`` heads (top eigenvector of the Gram matrix of
   their pair-``i`` weights): the shared rope key is ``sum_j u_j W^K_j`` (rotated, exact), and a query
   head of KV head ``j`` reads it with weight ``u_j``. What is left of each head's key,
   ``W^K_j - u_j sum_l u_l W^K_l``, joins the no-rope block and loses its rotation: that is the
   approximation, reported as the logit change. With one KV head (MQA) nothing is left: exact.

The latent norm is not representable (it would rescale each token's latent), so converted models
have ``latent_norm=False``. Softmax scales: the source's ``1/sqrt(d)`` is kept by scaling the query
weights by ``sqrt(d_nope + d_rope) / sqrt(d)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import List, Optional

import torch

from megatron_ext.config import GQLAConfig


@dataclasses.dataclass
class LayerReport:
    layer: int
    kv_rel_error: float        # ||B - W_up W_DKV||_F / ||B||_F of the stacked no-rope K and V
    rope_rel_residual: float   # share of the key weights' norm that left the rope key (0 without rope)


@dataclasses.dataclass
class ConversionReport:
    groups: int
    kv_lora_rank: int
    full_rank: int
    gqla: GQLAConfig
    layers: List[LayerReport]

    def lines(self) -> List[str]:
        out = [f"TransGQLA: G={self.groups} r_kv={self.kv_lora_rank} (full rank {self.full_rank}); "
               f"d_nope={self.gqla.qk_head_dim} d_rope={self.gqla.qk_pos_emb_head_dim} d_v={self.gqla.v_head_dim}"]
        for r in self.layers:
            out.append(f"  layer {r.layer:3d}: K/V relative reconstruction error {r.kv_rel_error:.3e}, "
                       f"key share moved out of RoPE {r.rope_rel_residual:.3e}")
        return out


def _fail(field, value, why, allowed):
    raise ValueError(f"{field}={value!r}: {why}; use {allowed}")


def split_fused_qkv(weight: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Megatron's fused ``linear_qkv.weight [Gs (H/Gs + 2) d, h]``: per KV group, its ``H/Gs`` query
    heads, then its key, then its value. -> ``Q [H, d, h]``, ``K [Gs, d, h]``, ``V [Gs, d, h]``."""
    per = num_heads // num_groups
    w = weight.view(num_groups, per + 2, head_dim, weight.shape[-1])
    return w[:, :per].reshape(num_heads, head_dim, -1), w[:, per], w[:, per + 1]


def _source_groups(g: int, groups: int, src_groups: int) -> List[int]:
    if groups <= src_groups:
        m = src_groups // groups
        return list(range(g * m, (g + 1) * m))
    return [g // (groups // src_groups)]


def _rope_split(K: torch.Tensor):
    """``K [Gs, d, h]`` -> shared rope key ``[d, h]``, per-pair head weights ``u [Gs, d/2]``, residual."""
    Gs, d, _ = K.shape
    half = d // 2
    shared = torch.zeros_like(K[0])
    u_all = torch.zeros(Gs, half, dtype=K.dtype)
    for i in range(half):
        pair = K[:, [i, i + half]].reshape(Gs, -1)                  # [Gs, 2h]
        _, evecs = torch.linalg.eigh(pair @ pair.T)
        u = evecs[:, -1]
        u = u if u.sum() >= 0 else -u
        u_all[:, i] = u
        shared[[i, i + half]] = torch.einsum("j,jch->ch", u, K[:, [i, i + half]])
    residual = K.clone()
    for i in range(half):
        for j in range(Gs):
            residual[j, [i, i + half]] -= u_all[j, i] * shared[[i, i + half]]
    return shared, u_all, residual


@torch.no_grad()
def _convert_layer(src_attn, dst_attn, H, Gs, d, G, r, rope: bool) -> LayerReport:
    dtype = torch.float64
    Q, K, V = (t.to(dtype) for t in split_fused_qkv(src_attn.linear_qkv.weight, H, Gs, d))
    W_O = src_attn.linear_proj.weight.to(dtype)                      # [h, H d]
    hidden = W_O.shape[0]
    if rope:
        k_rope, u, K_nope = _rope_split(K)
        rope_residual = (K_nope.norm() / K.norm()).item()
    else:
        k_rope, u, K_nope, rope_residual = None, None, K, 0.0
    gq = dst_attn.gqla
    dn, dr, dv = gq.qk_head_dim, gq.qk_pos_emb_head_dim, gq.v_head_dim
    blocks = []
    for g in range(G):
        js = _source_groups(g, G, Gs)
        blocks.append(torch.cat([K_nope[j] for j in js] + [V[j] for j in js], dim=0))  # [dn + dv, h]
    B = torch.cat(blocks, dim=0)                                                          # [G (dn+dv), h]
    U, S, Vh = torch.linalg.svd(B, full_matrices=False)
    k = min(r, S.numel())
    w_up = torch.zeros(B.shape[0], r, dtype=dtype)
    w_dkv = torch.zeros(r, hidden, dtype=dtype)
    w_up[:, :k] = U[:, :k] * S[:k]
    w_dkv[:k] = Vh[:k]
    kv_err = ((B - w_up @ w_dkv).norm() / B.norm()).item()

    scale_fix = math.sqrt(dn + dr) / math.sqrt(d)
    hq = H // G
    q = torch.zeros(H, dn + dr, hidden, dtype=dtype)
    o = torch.zeros(hidden, H, dv, dtype=dtype)
    for h in range(H):
        j = h // (H // Gs)
        slot = _source_groups(h // hq, G, Gs).index(j)
        q[h, slot * d:(slot + 1) * d] = Q[h] * scale_fix
        if rope:
            coeff = torch.cat([u[j], u[j]])                          # pair i and i + d/2 share u_j
            q[h, dn:] = Q[h] * coeff[:, None] * scale_fix
        o[:, h, slot * d:(slot + 1) * d] = W_O[:, h * d:(h + 1) * d]
    dst_attn.linear_q_proj.weight.copy_(q.reshape(H * (dn + dr), hidden))
    down = w_dkv if not rope else torch.cat([w_dkv, k_rope], dim=0)
    dst_attn.linear_kv_down_proj.weight.copy_(down)
    dst_attn.linear_kv_up_proj.weight.copy_(w_up)
    dst_attn.linear_proj.weight.copy_(o.reshape(hidden, H * dv))
    return LayerReport(layer=dst_attn.layer_number, kv_rel_error=kv_err, rope_rel_residual=rope_residual)


def convert_gqa_to_gqla(src_model, groups: int, kv_lora_rank: int, backend: str = "auto"):
    """A new GPTModel whose attention layers are GQLA, converted from ``src_model`` (a GPTModel of
    this project's dense spec, Megatron ``SelfAttention`` with fused ``linear_qkv``), and a
    :class:`ConversionReport`. Runs on one rank (TP = PP = 1); every other weight is copied."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from layer_specs.gpt import gpt_block_spec

    cfg = src_model.config
    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        _fail("tensor/pipeline_model_parallel_size", (ps.get_tensor_model_parallel_world_size(),
              ps.get_pipeline_model_parallel_world_size()), "the conversion runs on one rank", "(1, 1)")
    if getattr(cfg, "gqla", None) is not None or getattr(cfg, "mhc", None) is not None \
            or getattr(cfg, "sparse_attention", None) is not None:
        _fail("source", "gqla/mhc/sparse model", "gqa-to-gqla converts the dense GQA spec", "a dense GQA model")
    if getattr(cfg, "qk_layernorm", False) or getattr(cfg, "add_qkv_bias", False) or cfg.add_bias_linear:
        _fail("source", "qk_layernorm/bias", "a normalised or biased key is not a linear map of h_t",
              "a source without qk_layernorm and biases")
    H = cfg.num_attention_heads
    Gs = cfg.num_query_groups or H
    d = cfg.kv_channels
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or H % groups:
        _fail("groups", groups, f"must divide num_attention_heads={H}", "a divisor of the head count")
    if Gs % groups and groups % Gs:
        _fail("groups", groups, f"must divide, or be a multiple of, the source's num_query_groups={Gs}",
              f"a divisor or multiple of {Gs}")
    if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or kv_lora_rank < 1:
        _fail("kv_lora_rank", kv_lora_rank, "must be a positive integer", "an integer >= 1")
    rope = src_model.position_embedding_type == "rope"
    if src_model.position_embedding_type not in ("rope", "learned_absolute", "none"):
        _fail("position_embedding_type", src_model.position_embedding_type, "not convertible",
              "'rope', 'learned_absolute' or 'none'")
    if rope and (getattr(src_model, "rotary_percent", 1.0) != 1.0 or getattr(cfg, "rotary_interleaved", False)):
        _fail("rotary_percent/rotary_interleaved", (src_model.rotary_percent, cfg.rotary_interleaved),
              "the rope key is rebuilt from full, non-interleaved RoPE", "(1.0, False)")
    m = max(1, Gs // groups)
    gq = GQLAConfig(num_query_groups=groups, kv_lora_rank=kv_lora_rank, qk_head_dim=m * d,
                    qk_pos_emb_head_dim=d if rope else 0, v_head_dim=m * d, latent_norm=False,
                    rotary_base=float(getattr(src_model, "rotary_base", 10000)), backend=backend)
    dst_cfg = copy.copy(cfg)
    dst_cfg.gqla = gq
    dst_cfg.num_query_groups = groups
    dst = GPTModel(config=dst_cfg, transformer_layer_spec=gpt_block_spec(dst_cfg),
                   vocab_size=src_model.vocab_size, max_sequence_length=src_model.max_sequence_length,
                   pre_process=src_model.pre_process, post_process=src_model.post_process,
                   parallel_output=True,
                   share_embeddings_and_output_weights=src_model.share_embeddings_and_output_weights,
                   position_embedding_type=src_model.position_embedding_type)
    dst = dst.to(dtype=next(src_model.parameters()).dtype, device=next(src_model.parameters()).device)
    src_state = {k: v for k, v in src_model.state_dict().items()
                 if ".self_attention." not in k and not k.endswith("_extra_state")}
    _, unexpected = dst.load_state_dict(src_state, strict=False)
    assert not unexpected, unexpected
    layers = []
    for src_layer, dst_layer in zip(src_model.decoder.layers, dst.decoder.layers):
        layers.append(_convert_layer(src_layer.self_attention, dst_layer.self_attention,
                                     H, Gs, d, groups, kv_lora_rank, rope))
    full = min(groups * 2 * m * d, cfg.hidden_size)
    return dst, ConversionReport(groups, kv_lora_rank, full, gq, layers)


@torch.no_grad()
def logit_change(src_model, dst_model, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
    """Relative L2 change of the logits, the max abs change, and both models' mean next-token loss
    on ``tokens [b, s]``."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    out = []
    for model in (src_model, dst_model):
        model.eval()
        out.append(model(tokens, position_ids, None).float())  # [b, s, vocab]
    a, b = out
    ce = lambda z: torch.nn.functional.cross_entropy(  # noqa: E731
        z[:, :-1].reshape(-1, z.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    return {"rel_l2": ((b - a).norm() / a.norm()).item(), "max_abs": (b - a).abs().max().item(),
            "loss_src": ce(a), "loss_dst": ce(b)}
