"""Upstream megatron-core bugs hit on every lane without Transformer Engine."""

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
