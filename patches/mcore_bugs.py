"""Upstream megatron-core bugs and limits hit on every lane (not CPU-specific)."""

from __future__ import annotations

from patches import patch


@patch("moe_te_general_gemm_name", lane="any",
       reason="moe_utils.RouterGatingLinearFunction tests `te_general_gemm is not None`, but the name "
              "is only bound when Transformer Engine imports: NameError on every MoE forward without TE")
def _te_general_gemm():
    import megatron.core.transformer.moe.moe_utils as mu

    if not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


@patch("mla_have_te_mock", lane="any",
       reason="multi_latent_attention.HAVE_TE is True without TE because extensions/transformer_engine "
              "imports with MagicMock classes; isinstance(x, TELinear) then raises TypeError")
def _mla_have_te():
    from megatron_ext.compat import HAVE_TE

    if HAVE_TE:
        return
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False


@patch("pp_p2p_stream_width", lane="any",
       reason="pipeline_parallel/schedules.get_tensor_shapes sizes p2p buffers with config.hidden_size; "
              "mHC layers exchange n streams ([s, b, n*hidden]), so multiply by config.mhc_num_streams "
              "(absent: 1, no change). Upstream Megatron refuses mHC with PP>1 for this reason")
def _pp_stream_width():
    import functools

    import megatron.core.pipeline_parallel.schedules as sch

    original = sch.get_tensor_shapes

    @functools.wraps(original)
    def get_tensor_shapes(*args, **kwargs):
        shapes = original(*args, **kwargs)
        n = getattr(kwargs.get("config"), "mhc_num_streams", None) or 1
        return [tuple(shape[:-1]) + (shape[-1] * n,) for shape in shapes] if n > 1 else shapes

    sch.get_tensor_shapes = get_tensor_shapes
