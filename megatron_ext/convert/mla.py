"""MLA -> GQLA: share each group's K/V up-projection among its heads (arXiv 2605.15250, section 3.1).

Megatron's ``MLASelfAttention`` (DeepSeek-V2, arXiv 2405.04434, eq. 9-19) has one up-projection block
per query head, ``W^UK_h [d_nope, r]`` and ``W^UV_h [d_v, r]``; GQLA with ``G`` groups has one per group.
Everything else (latent ``W_DKV``, its norm, the rope key ``W_KR``, the query projection or q-LoRA)
carries over. What a head computes from the latent is a pair of bilinear maps:

    score_h = x^T (W_Qh^T W^UK_h) c        (x: the query input, h_t or the q-LoRA latent)
    out_h   = (W_Oh W^UV_h) (sum_j p_j c_j)

For a group ``g`` with heads ``h in g`` we look for one row space ``P_g [d, r]`` (orthonormal rows) that
serves all of them: ``W_Qh^T W^UK_h ~= (W_Qh^T W^UK_h P_g^T) P_g``. The best one in the summed Frobenius
norm is the top-``d`` right singular vectors of the stack of the heads' maps ``[W_Qh^T W^UK_h]_h``
(Eckart-Young). Then ``W^UK_g = P_g`` and head ``h``'s query weight becomes
``(W^UK_h P_g^T)^T W_Qh``; the value side is the same with ``W_Oh``: ``W^UV_g = P'_g`` and
``W_Oh <- W_Oh W^UV_h P'_g^T``. The reported relative error is that of the stacked maps:
``sqrt(discarded / all squared singular values)``.

Exact when ``G = H`` (each map has rank <= d) and, at any G, when the group dims are widened to
``H/G`` times the head's (``qk_head_dim=m*d_nope``, ``v_head_dim=m*d_v``, the GQA cache then saves
nothing). Otherwise an approximation whose error grows as G falls (nested groups: a shared subspace
for a union of heads is never better than one per part).

RoPE: Megatron's MLA pairs rope dims ``(2i, 2i+1)`` (it de-interleaves before rotating); GQLA pairs
``(i, i + d/2)``. The rope rows of ``W_KR`` and of each head's query are permuted accordingly: exact.
The softmax scale (``1/sqrt(d_nope + d_rope)`` times MLA's YaRN ``mscale^2``) is kept by scaling the
query weights when the GQLA dims differ.

A narrower latent (``kv_lora_rank`` R below MLA's r) is possible only without the latent norm (an
RMSNorm over r dims is not a linear map that a rank-R factorisation could absorb): the stacked group
maps ``B = W_up W_DKV [G (d_nope + d_v), h]`` are then refactored by a truncated SVD as in TransGQLA
(Eckart-Young; the relative error of ``B`` is reported).

:func:`convert_mla_model_to_gqla` converts every layer of a GPTModel into a GQLA GPTModel built from
the converted run's config (``megatron-ext convert mla-to-gqla``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import List, Optional

import torch

from megatron_ext.config import GQLAConfig


@dataclasses.dataclass
class MLAConversionReport:
    groups: int
    qk_head_dim: int
    v_head_dim: int
    key_rel_error: float     # ||stack_h(W_Qh^T W^UK_h) - shared-subspace approx||_F / ||.||_F, all groups
    value_rel_error: float   # same for W_Oh W^UV_h
    kv_lora_rank: int = 0    # the GQLA latent width
    latent_rel_error: float = 0.0  # ||B - W_up' W_DKV'||_F / ||B||_F of a narrower latent (0: kept)
    layer: int = 1

    def line(self) -> str:
        return (f"MLA -> GQLA: G={self.groups} d_nope={self.qk_head_dim} d_v={self.v_head_dim}: "
                f"key map relative error {self.key_rel_error:.3e}, value map {self.value_rel_error:.3e}")

    def layer_line(self) -> str:
        return (f"  layer {self.layer:3d}: key map relative error {self.key_rel_error:.3e}, value map "
                f"{self.value_rel_error:.3e}, latent (r_kv={self.kv_lora_rank}) {self.latent_rel_error:.3e}")


def _fail(field, value, why, allowed):
    raise ValueError(f"{field}={value!r}: {why}; use {allowed}")


def _shared_rows(blocks: List[torch.Tensor], weights: List[torch.Tensor], d: int):
    """Top-``d`` right singular vectors ``P [d, r]`` of the stack of ``W_h^T B_h`` (rows beyond its rank
    are zero), plus the discarded and total squared singular values. ``W_h^T = Q_h R_h`` (QR) leaves the
    singular values and right vectors unchanged, so the SVD runs on the small ``[sum d_h, r]`` stack of
    ``R_h B_h`` (and without squaring the condition number, as a Gram matrix would)."""
    r = blocks[0].shape[1]
    stack = torch.cat([torch.linalg.qr(w.T, mode="reduced").R @ b for b, w in zip(blocks, weights)], dim=0)
    _, S, Vh = torch.linalg.svd(stack, full_matrices=False)
    keep = min(d, S.numel())
    P = torch.zeros(d, r, dtype=stack.dtype)
    P[:keep] = Vh[:keep]
    power = S.pow(2)
    return P, power[keep:].sum(), power.sum()


@torch.no_grad()
def convert_mla_to_gqla(mla, groups: int, qk_head_dim: Optional[int] = None, v_head_dim: Optional[int] = None,
                        backend: str = "auto", kv_lora_rank: Optional[int] = None):
    """A :class:`megatron_ext.modules.gqla.GQLAttention` with ``groups`` K/V up-projection blocks from a
    Megatron ``MLASelfAttention`` ``mla`` (one rank, TP = 1; ``rope_type="rope"``), and a
    :class:`MLAConversionReport`. ``qk_head_dim`` / ``v_head_dim`` default to the MLA head's,
    ``kv_lora_rank`` to MLA's (a smaller one needs an MLA without the latent norm)."""
    from megatron.core import parallel_state as ps

    from megatron_ext.modules.gqla import GQLAttention, gqla_spec

    cfg = mla.config
    if ps.get_tensor_model_parallel_world_size() != 1:
        _fail("tensor_model_parallel_size", ps.get_tensor_model_parallel_world_size(),
              "the conversion runs on one rank", "1")
    if getattr(cfg, "rope_type", "rope") != "rope" or getattr(cfg, "rotary_percent", 1.0) != 1.0 \
            or getattr(cfg, "rotary_interleaved", False):
        _fail("rope_type", getattr(cfg, "rope_type", None), "GQLA applies plain full RoPE (no YaRN scaling)",
              "an MLA model with rope_type='rope', rotary_percent=1.0, rotary_interleaved=False")
    if cfg.add_bias_linear:
        _fail("add_bias_linear", True, "biased projections are not linear maps of the latent", "False")
    H, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or H % groups:
        _fail("groups", groups, f"must divide num_attention_heads={H}", "a divisor of the head count")
    # Megatron's local spec puts IdentityOp in the norm slots unless qk_layernorm is set
    latent_norm = any(True for _ in mla.kv_layernorm.parameters())
    if cfg.q_lora_rank is not None and not any(True for _ in mla.q_layernorm.parameters()):
        _fail("q_layernorm", type(mla.q_layernorm).__name__, "GQLA's q-LoRA always normalises its latent",
              "an MLA model with qk_layernorm=True, or without q-LoRA")
    R = r if kv_lora_rank is None else kv_lora_rank
    if isinstance(R, bool) or not isinstance(R, int) or not 1 <= R <= r:
        _fail("kv_lora_rank", R, f"the GQLA latent is a subspace of MLA's kv_lora_rank={r}", f"1 <= R <= {r}")
    if R < r and latent_norm:
        _fail("kv_lora_rank", R, f"the MLA latent is normalised over all its {r} dims (kv_layernorm), which "
              "no narrower linear latent reproduces", f"{r} (MLA's), or an MLA without the latent norm")
    dn2 = dn if qk_head_dim is None else qk_head_dim
    dv2 = dv if v_head_dim is None else v_head_dim
    gq = GQLAConfig(num_query_groups=groups, kv_lora_rank=R, qk_head_dim=dn2, qk_pos_emb_head_dim=dr,
                    v_head_dim=dv2, q_lora_rank=cfg.q_lora_rank, latent_norm=latent_norm,
                    rotary_base=float(getattr(cfg, "rotary_base", 10000)), backend=backend)
    gq.validate(H, 1)
    dst_cfg = copy.copy(cfg)
    dst_cfg.gqla = gq
    spec = gqla_spec()
    dst = GQLAttention(dst_cfg, spec.submodules, layer_number=getattr(mla, "layer_number", 1))
    w_ref = mla.linear_kv_up_proj.weight
    dst = dst.to(dtype=w_ref.dtype, device=w_ref.device)

    f64 = torch.float64
    q_lin = "linear_q_proj" if cfg.q_lora_rank is None else "linear_q_up_proj"
    Wq = getattr(mla, q_lin).weight.to(f64).view(H, dn + dr, -1)
    Qn, Qr = Wq[:, :dn], Wq[:, dn:]
    Wup = mla.linear_kv_up_proj.weight.to(f64).view(H, dn + dv, r)
    Wk, Wv = Wup[:, :dn], Wup[:, dn:]
    Wo = mla.linear_proj.weight.to(f64)                               # [hidden, H dv]
    hidden = Wo.shape[0]
    Oh = Wo.view(hidden, H, dv).permute(1, 0, 2)                      # [H, hidden, dv]
    # MLA rotates pairs (2i, 2i+1), GQLA pairs (i, i + d/2)
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])
    scale = mla.softmax_scale * math.sqrt(dn2 + dr)                  # keep MLA's softmax scale
    m = H // groups
    q_new = torch.zeros(H, dn2 + dr, Wq.shape[-1], dtype=f64)
    up_new = torch.zeros(groups, dn2 + dv2, r, dtype=f64)
    o_new = torch.zeros(H, hidden, dv2, dtype=f64)
    lost = {"k": 0.0, "v": 0.0}
    total = {"k": 0.0, "v": 0.0}
    for g in range(groups):
        hs = range(g * m, (g + 1) * m)
        Pk, lk, tk = _shared_rows([Wk[h] for h in hs], [Qn[h] for h in hs], dn2)
        Pv, lv, tv = _shared_rows([Wv[h] for h in hs], [Oh[h].T for h in hs], dv2)
        lost["k"] += lk.item(); total["k"] += tk.item()   # noqa: E702
        lost["v"] += lv.item(); total["v"] += tv.item()   # noqa: E702
        up_new[g, :dn2], up_new[g, dn2:] = Pk, Pv
        for h in hs:
            q_new[h, :dn2] = (Wk[h] @ Pk.T).T @ Qn[h] * scale
            q_new[h, dn2:] = Qr[h][perm] * scale
            o_new[h] = Oh[h] @ (Wv[h] @ Pv.T)
    getattr(dst, q_lin).weight.copy_(q_new.reshape(H * (dn2 + dr), -1))
    if cfg.q_lora_rank is not None:
        dst.linear_q_down_proj.weight.copy_(mla.linear_q_down_proj.weight)
        dst.q_layernorm.load_state_dict(_norm_state(mla.q_layernorm))
    down = mla.linear_kv_down_proj.weight
    up, latent_down, latent_err = up_new.reshape(groups * (dn2 + dv2), r), down[:r].to(f64), 0.0
    if R < r:
        # no norm between them: the latent is a linear map, refactor the product at rank R
        B = up @ latent_down
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        up, latent_down = U[:, :R] * S[:R], Vh[:R]
        latent_err = ((B - up @ latent_down).norm() / B.norm()).item() if B.norm() > 0 else 0.0
    dst.linear_kv_down_proj.weight.copy_(torch.cat([latent_down.to(down.dtype), down[r:][perm]], dim=0))
    if latent_norm:
        dst.kv_layernorm.load_state_dict(_norm_state(mla.kv_layernorm))
    dst.linear_kv_up_proj.weight.copy_(up)
    dst.linear_proj.weight.copy_(o_new.permute(1, 0, 2).reshape(hidden, H * dv2))
    rel = lambda k: math.sqrt(lost[k] / total[k]) if total[k] > 0 else 0.0  # noqa: E731
    return dst, MLAConversionReport(groups, dn2, dv2, rel("k"), rel("v"), R, latent_err,
                                    getattr(mla, "layer_number", 1))


def _norm_state(norm):
    """Megatron's norms (``WrappedTorchNorm``, TE, apex) keep ``weight`` (and ``bias``); ours too."""
    return {k: v for k, v in norm.state_dict().items() if k in ("weight", "bias")}


@torch.no_grad()
def convert_mla_model_to_gqla(src_model, dst_model, groups: int, kv_lora_rank: Optional[int] = None,
                              backend: str = "auto") -> List[MLAConversionReport]:
    """Fill ``dst_model`` (a GPTModel whose layers are GQLA with ``groups`` groups, built from the
    converted run's config) from ``src_model`` (a GPTModel of Megatron ``MLASelfAttention`` layers):
    every weight outside attention is copied by name, every attention layer converted. One rank."""
    if len(src_model.decoder.layers) != len(dst_model.decoder.layers):
        _fail("num_layers", len(dst_model.decoder.layers), "the target model has another layer count",
              f"{len(src_model.decoder.layers)} layers, as the source")
    src_state = {k: v for k, v in src_model.state_dict().items()
                 if ".self_attention." not in k and not k.endswith("_extra_state")}
    missing, unexpected = dst_model.load_state_dict(src_state, strict=False)
    # whatever the target has beyond the source must be attention, converted below
    left = [k for k in missing if ".self_attention." not in k and not k.endswith("_extra_state")]
    if left or unexpected:
        _fail("source", {"missing": left, "unexpected": list(unexpected)},
              "the models differ outside attention", "a source and target of the same config otherwise")
    reports = []
    for src_layer, dst_layer in zip(src_model.decoder.layers, dst_model.decoder.layers):
        attn, report = convert_mla_to_gqla(src_layer.self_attention, groups, kv_lora_rank=kv_lora_rank,
                                           backend=backend)
        target = dst_layer.self_attention
        if (target.gqla.num_query_groups, target.r_kv, target.d_nope, target.d_v) != \
                (groups, report.kv_lora_rank, report.qk_head_dim, report.v_head_dim):
            _fail("target", (target.gqla.num_query_groups, target.r_kv, target.d_nope, target.d_v),
                  "the target GQLA layers have other dims than the conversion's",
                  f"(G, r_kv, d_nope, d_v) = {(groups, report.kv_lora_rank, report.qk_head_dim, report.v_head_dim)}")
        missing, unexpected = target.load_state_dict(
            {k: v for k, v in attn.state_dict().items() if not k.endswith("_extra_state")}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:  # e.g. a latent norm on one side only
            _fail("target", {"missing": missing, "unexpected": list(unexpected)},
                  "the target GQLA layers have other weights than the converted ones",
                  "a target built from the converted run's config")
        reports.append(report)
    return reports
