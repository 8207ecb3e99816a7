"""``dense_layer``: one Megatron TransformerLayer forward + backward, bf16, TP=1.

ours   = ``layer_specs.gpt.dense_layer_spec()`` (core attention = torch SDPA, causal kernel);
anchor = ``get_gpt_layer_local_spec()`` (Megatron ``DotProductAttention``: materialises the
         [b, heads, s, s] scores, masks and softmaxes them, then multiplies by V).
Both share one TransformerConfig and are cast to bf16 (as Megatron's Float16Module does; the local
spec's torch LayerNorm is otherwise built in fp32). Input ``x [s, b, h]`` requires grad; backward
takes a random ``[s, b, h]`` gradient. Full: s=4096, b=2, h=2048, 16 heads (d=128), ffn 8192 gelu.
"""

from __future__ import annotations

import dataclasses

from bench.cases import Benchmark, Case
from bench.flops import layer_fwd_bwd_flops
from bench.registry import register


@dataclasses.dataclass(frozen=True)
class Dims:
    s: int
    b: int
    hidden: int
    heads: int
    ffn: int


FULL = Dims(s=4096, b=2, hidden=2048, heads=16, ffn=8192)
SMALL = Dims(s=64, b=2, hidden=64, heads=4, ffn=256)


def layer_config(d: Dims, **overrides):
    """The TransformerConfig both sides share: bf16, local impl, no bias, no dropout, no fusions
    (``overrides``: other TransformerConfig fields, e.g. ``normalization``)."""
    import torch

    from megatron_ext.compat import make_transformer_config

    return make_transformer_config(
        num_layers=1, hidden_size=d.hidden, num_attention_heads=d.heads, ffn_hidden_size=d.ffn,
        gated_linear_unit=False, bf16=True, params_dtype=torch.bfloat16, transformer_impl="local",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        **overrides)


def _ours_spec():
    from layer_specs.gpt import dense_layer_spec

    return dense_layer_spec()


def _anchor_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec()


def _layer_setup(spec_fn, d: Dims, device: str, width: int | None = None, layer_number: int = 1,
                 **config):
    """Build the layer and fresh ``x, grad [s, b, width]`` (width defaults to h); the timed call
    is fwd + bwd. ``config``: overrides of :func:`layer_config`."""
    import torch

    from bench.parallel import ensure_model_parallel

    ensure_model_parallel(cpu=device == "cpu")
    from megatron.core.transformer.spec_utils import build_module

    layer = build_module(spec_fn(), config=layer_config(d, **config), layer_number=layer_number)
    layer = layer.to(device=device, dtype=torch.bfloat16).train()
    params = list(layer.parameters())
    width = width or d.hidden
    x = torch.randn(d.s, d.b, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(d.s, d.b, width, device=device, dtype=torch.bfloat16)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = layer(x, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return step


@register
def dense_layer(small: bool = False, device: str = "cuda") -> Benchmark:
    d = SMALL if small else FULL
    flops = layer_fwd_bwd_flops(d.s, d.b, d.hidden, d.heads, d.ffn, causal=True)
    return Benchmark(
        name="dense_layer",
        description="Megatron TransformerLayer fwd+bwd: SDPA core attention vs DotProductAttention",
        shape=(f"x[s={d.s}, b={d.b}, h={d.hidden}] bf16; {d.heads} heads x d={d.hidden // d.heads}, "
               f"ffn {d.ffn} gelu (no GLU), causal, TP=1, fwd+bwd"),
        cases=[
            Case(name="ours", label="ours: sdpa dense layer", role="ours",
                 setup=lambda: _layer_setup(_ours_spec, d, device), flops=flops, bound="compute"),
            Case(name="anchor", label="anchor: megatron DotProductAttention", role="anchor",
                 setup=lambda: _layer_setup(_anchor_spec, d, device), flops=flops, bound="compute"),
        ])
