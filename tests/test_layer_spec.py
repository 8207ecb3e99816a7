"""The dense spec equals Megatron's own local spec: same weights -> same logits and gradients.

This pins the project's SDPA core attention and norm to upstream's DotProductAttention and norm,
so later specs that swap parts of this one start from a verified base.
"""

import pytest
import torch

from megatron_ext import compat
from tests.helpers import cpu_model_parallel


@pytest.fixture(scope="module")
def parallel_state():
    with cpu_model_parallel(7):
        yield


def _config(normalization, groups):
    return compat.make_transformer_config(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=groups, ffn_hidden_size=128,
        normalization=normalization, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, transformer_impl="local", bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, params_dtype=torch.float64, this_field_is_unknown=1)


@pytest.mark.parametrize("normalization,groups", [("RMSNorm", 4), ("LayerNorm", 2), ("RMSNorm", 1)])
def test_dense_spec_matches_megatron_local_spec(parallel_state, normalization, groups):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from layer_specs.gpt import gpt_block_spec

    cfg = _config(normalization, groups)
    kw = dict(config=cfg, vocab_size=128, max_sequence_length=32, position_embedding_type="rope")
    ours = GPTModel(transformer_layer_spec=gpt_block_spec(cfg), **kw).double()
    upstream = GPTModel(transformer_layer_spec=get_gpt_layer_local_spec(normalization=normalization), **kw).double()
    missing, unexpected = upstream.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)

    tokens = torch.randint(0, 128, (3, 32))
    pos = torch.arange(32).expand(3, -1)
    mask = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), 1)
    outs = []
    for model in (ours, upstream):
        logits = model(tokens, pos, mask)
        (logits.double() ** 2).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-10)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-8, atol=1e-10, msg=name)


def test_unknown_config_fields_are_dropped_not_fatal(parallel_state):
    cfg = _config("RMSNorm", 4)
    assert not hasattr(cfg, "this_field_is_unknown")


@pytest.mark.parametrize("overrides", [
    dict(mhc_num_streams=4, attention_pattern="WT", window_size=4, sparse_topk=4, num_query_groups=1,
         num_experts=4, mtp_num_layers=1, sparse_attention_backend="torch", mhc_backend="torch",
         moe_backend="torch"),
    dict(mhc_num_streams=2, mhc_mode="static", num_experts=4, moe_shared_expert_intermediate_size=16),
    dict(attention_type="gqla", num_query_groups=2),
    dict(attention_type="gqla", num_query_groups=2, attention_pattern="T", sparse_topk=4, gqla_backend="torch",
         sparse_attention_backend="torch"),
    dict(attention_type="mla"),
], ids=["mhc_sparse_moe_mtp", "mhc_static_moe", "gqla", "gqla_topk", "mla"])
def test_every_parameter_is_read_after_its_modules_forward_pre_hooks(parallel_state, overrides):
    """Megatron's DDP with --overlap-param-gather (the distributed optimizer) waits for a
    parameter's all-gather in the forward pre-hook of the module that owns it; a parameter read
    before that module is called would be last step's value on other ranks' shards. With every
    parameter NaN until its module's hooks run (tests.helpers.forward_with_late_params), the whole
    model gives exactly the plain forward's loss. (Before the fix, the mHC mixers' weights and
    folded norms and GQLA's up-projection were read before their hooks.)"""
    from megatron_ext.config import from_preset
    from megatron_ext.training.model import build_gpt, transformer_config
    from tests.helpers import forward_with_late_params

    cfg = from_preset("test", **overrides)
    torch.manual_seed(0)
    model = build_gpt(cfg, transformer_config(cfg, "cpu", False), 256)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, cfg.seq_length), generator=g)
    kw = dict(input_ids=ids, position_ids=torch.arange(cfg.seq_length).expand(2, -1), attention_mask=None,
              labels=torch.randint(0, 256, (2, cfg.seq_length), generator=g))
    want = model(**kw)
    got, missed = forward_with_late_params(model, **kw)
    assert missed == [] and got.isfinite().all(), missed
    torch.testing.assert_close(got, want, rtol=0, atol=0)
