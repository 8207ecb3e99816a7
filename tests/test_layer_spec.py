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
