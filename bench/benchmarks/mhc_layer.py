"""``mhc_layer``: a whole Megatron TransformerLayer with mHC n=4 vs the same layer with a plain
residual, forward + backward, bf16, TP=1, RMSNorm (the paper reports 6.7% overhead; target <= 7%).

anchor = the dense layer of ``layer_specs.gpt.dense_layer_spec()`` on ``x [s, b, C]``;
ours   = ``layer_specs.mhc.mhc_layer_spec`` (fused Triton mixers, the sublayers' input RMSNorms
         folded into the sites: the default) on the streams ``[s, b, 4*C]`` of a middle layer (two
         mixing sites: around attention and around the MLP);
ref    = the same mHC layer with separate norms (``fold_norm=False``), and with the torch
         reference mixers.
The ratio column is anchor ms / ours ms, so the overhead of mHC is 1/ratio - 1. (Until
2026-11-23 both layers used Megatron's default LayerNorm, which the sites do not fold.)

``mhc_layer_c4096`` / ``mhc_layer_c7168``: ours and the anchor at wider hidden sizes (7168 is
DeepSeek-V3's), 4096 tokens, head dim 128, ffn 4C: the mixers' stream traffic grows as n*C per
token and the layer's matmuls as C^2, so the overhead shrinks with the width.
"""

from __future__ import annotations

from bench.benchmarks.dense_layer import FULL, SMALL, Dims, _layer_setup
from bench.cases import Benchmark, Case
from bench.flops import layer_fwd_bwd_flops
from bench.registry import register

STREAMS = 4


NORM = "RMSNorm"


def _setup(d: Dims, device: str, mhc_backend: str | None, fold_norm: bool = True):
    """The plain layer on ``[s, b, C]`` (mhc_backend None) or a middle mHC layer on ``[s, b, 4C]``."""
    from layer_specs.gpt import dense_layer_spec
    from layer_specs.mhc import mhc_layer_spec
    from megatron_ext.config import MHCConfig

    if mhc_backend is None:
        return _layer_setup(dense_layer_spec, d, device, layer_number=2, normalization=NORM)
    mhc = MHCConfig(num_streams=STREAMS, backend=mhc_backend, fold_norm=fold_norm)
    return _layer_setup(lambda: mhc_layer_spec(mhc, normalization=NORM), d, device,
                        width=STREAMS * d.hidden, layer_number=2, normalization=NORM)


def _layer_benchmark(name: str, d: Dims, device: str, refs: bool) -> Benchmark:
    """Ours (folded norms) and the plain layer (the anchor) at the dims ``d``; ``refs``: also the
    separate-norm and torch-mixer layers."""
    flops = layer_fwd_bwd_flops(d.s, d.b, d.hidden, d.heads, d.ffn, causal=True)
    backend = "torch" if device == "cpu" else "triton"
    cases = [Case(name="ours", label=f"ours: mHC n=4 layer ({backend} mixers, norms folded)", role="ours",
                  setup=lambda: _setup(d, device, backend), flops=flops, bound="compute")]
    if refs:
        cases += [
            Case(name="ref_unfolded", label=f"ref: mHC n=4 layer ({backend} mixers, separate norms)",
                 role="ref", setup=lambda: _setup(d, device, backend, fold_norm=False), flops=flops,
                 bound="compute"),
            Case(name="ref_torch", label="ref: mHC n=4 layer (torch reference mixers)", role="ref",
                 setup=lambda: _setup(d, device, "torch"), flops=flops, bound="compute")]
    cases.append(Case(name="anchor", label="anchor: same layer, plain residual", role="anchor",
                      setup=lambda: _setup(d, device, None), flops=flops, bound="compute"))
    return Benchmark(
        name=name,
        description=f"TransformerLayer fwd+bwd with mHC n=4 mixers vs a plain residual at C={d.hidden}",
        shape=(f"x[s={d.s}, b={d.b}, C={d.hidden}] bf16 (mHC: {STREAMS} streams), {d.heads} heads, "
               f"ffn {d.ffn} gelu, {NORM}, causal, TP=1, fwd+bwd; TFLOP/s counts the layer's "
               f"matmuls only"),
        cases=cases)


@register
def mhc_layer(small: bool = False, device: str = "cuda") -> Benchmark:
    return _layer_benchmark("mhc_layer", SMALL if small else FULL, device, refs=True)


def _wide(name: str, d: Dims, small: bool, device: str) -> Benchmark:
    """Ours and the anchor at the width of ``d`` (``small``: a CPU smoke size)."""
    if small:
        d = Dims(s=32, b=1, hidden=d.hidden // 32, heads=2, ffn=4 * (d.hidden // 32))
    return _layer_benchmark(name, d, device, refs=False)


@register
def mhc_layer_c4096(small: bool = False, device: str = "cuda") -> Benchmark:
    return _wide("mhc_layer_c4096", Dims(s=4096, b=1, hidden=4096, heads=32, ffn=16384), small, device)


@register
def mhc_layer_c7168(small: bool = False, device: str = "cuda") -> Benchmark:
    """DeepSeek-V3's hidden size."""
    return _wide("mhc_layer_c7168", Dims(s=4096, b=1, hidden=7168, heads=56, ffn=28672), small, device)
