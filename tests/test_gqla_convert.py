"""TransGQLA (GQA -> GQLA): the exact identity at full rank without RoPE, reconstruction error falling
with r_kv, the RoPE split (exact for an MQA source, measured otherwise), and input errors."""

import pytest
import torch

import patches
from megatron_ext import compat
from megatron_ext.config import from_preset


@pytest.fixture
def parallel_state():
    """Per test: the in-process training test needs model parallel uninitialised."""
    import torch.distributed as dist

    from megatron_ext.training.distributed import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    patches.apply_patches("cpu")
    compat.initialize_model_parallel(1, 1, 1)
    compat.seed_model_parallel(3)
    yield
    compat.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def source_model(groups, position="learned_absolute", seed=0):
    """A dense GQA GPT from this project's builder, with fresh random weights (not the init)."""
    from megatron_ext.training.model import build_gpt, transformer_config

    cfg = from_preset("test", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
                      seq_length=16, position_embedding_type=position)
    torch.manual_seed(seed)
    model = build_gpt(cfg, transformer_config(cfg, "cpu", False), vocab_size=50)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def _tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (3, 16), generator=g)


@pytest.mark.parametrize("src_groups,groups", [(2, 2), (2, 1), (2, 4), (4, 2)])
def test_full_rank_without_rope_reproduces_the_source(parallel_state, src_groups, groups):
    from megatron_ext.convert import convert_gqa_to_gqla, logit_change

    src = source_model(src_groups)
    dst, report = convert_gqa_to_gqla(src, groups, kv_lora_rank=32, backend="torch")
    assert all(r.kv_rel_error < 1e-6 for r in report.layers), report.lines()
    assert not report.gqla.latent_norm and report.gqla.qk_pos_emb_head_dim == 0
    change = logit_change(src, dst, _tokens())
    assert change["max_abs"] < 1e-4 and change["rel_l2"] < 1e-5, change
    assert abs(change["loss_src"] - change["loss_dst"]) < 1e-5


def test_reconstruction_error_falls_as_rank_grows(parallel_state):
    from megatron_ext.convert import convert_gqa_to_gqla, logit_change

    src = source_model(2)
    errors, changes = [], []
    for rank in (2, 4, 8, 16, 24, 32):
        dst, report = convert_gqa_to_gqla(src, 2, kv_lora_rank=rank, backend="torch")
        errors.append([r.kv_rel_error for r in report.layers])
        changes.append(logit_change(src, dst, _tokens())["rel_l2"])
    for layer in range(2):
        per_rank = [e[layer] for e in errors]
        assert all(a > b for a, b in zip(per_rank, per_rank[1:])), per_rank
        assert per_rank[0] > 0.3 and per_rank[-1] < 1e-6
    assert changes[0] > changes[-1] and changes[-1] < 1e-5, changes


def test_rope_split_is_exact_for_an_mqa_source(parallel_state):
    from megatron_ext.convert import convert_gqa_to_gqla, logit_change

    src = source_model(1, position="rope")
    dst, report = convert_gqa_to_gqla(src, 1, kv_lora_rank=32, backend="torch")
    assert report.gqla.qk_pos_emb_head_dim == 8 and all(r.rope_rel_residual < 1e-12 for r in report.layers)
    change = logit_change(src, dst, _tokens())
    assert change["max_abs"] < 1e-4, change


def test_rope_split_cost_is_measured_for_a_gqa_source(parallel_state):
    from megatron_ext.convert import convert_gqa_to_gqla, logit_change

    src = source_model(2, position="rope")
    dst, report = convert_gqa_to_gqla(src, 2, kv_lora_rank=32, backend="torch")
    # random heads are nearly orthogonal: about half of each pair's key weight leaves the rope key
    assert all(0.3 < r.rope_rel_residual < 0.9 for r in report.layers), report.lines()
    assert all(r.kv_rel_error < 1e-6 for r in report.layers)
    change = logit_change(src, dst, _tokens())
    assert 1e-3 < change["rel_l2"] < 1.0, change


@pytest.mark.parametrize("groups,rank,match", [
    (3, 8, "groups=3: must divide num_attention_heads=4"),
    (2, 0, "kv_lora_rank=0: must be a positive integer"),
])
def test_conversion_input_errors(parallel_state, groups, rank, match):
    from megatron_ext.convert import convert_gqa_to_gqla

    with pytest.raises(ValueError, match=match):
        convert_gqa_to_gqla(source_model(2), groups, rank)


def test_split_fused_qkv_follows_megatron_layout():
    from megatron_ext.convert import split_fused_qkv

    H, Gs, d, h = 4, 2, 3, 5
    w = torch.arange((H + 2 * Gs) * d * h, dtype=torch.float64).view(-1, h)
    q, k, v = split_fused_qkv(w, H, Gs, d)
    # group 1's rows: its 2 query heads (heads 2, 3), then its key, then its value
    base = (H // Gs + 2) * d
    assert torch.equal(q[2], w[base:base + d]) and torch.equal(q[3], w[base + d:base + 2 * d])
    assert torch.equal(k[1], w[base + 2 * d:base + 3 * d]) and torch.equal(v[1], w[base + 3 * d:base + 4 * d])
