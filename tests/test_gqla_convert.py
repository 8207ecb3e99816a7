"""TransGQLA (GQA -> GQLA): the exact identity at full rank without RoPE, reconstruction error falling
with r_kv, the RoPE split (exact for an MQA source, measured otherwise), and input errors. MLA -> GQLA:
exact at G = H against Megatron's MLASelfAttention, and end to end over a ``--attention-type mla`` run."""

import pytest
import torch

from megatron_ext import compat
from megatron_ext.config import from_preset
from tests.helpers import cpu_model_parallel


@pytest.fixture
def parallel_state():
    """Per test: the in-process training test needs model parallel uninitialised."""
    with cpu_model_parallel(3):
        yield


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


# --- megatron-ext convert gqa-to-gqla over a run folder ---------------------------------------------

def test_convert_cli_reproduces_the_source_and_training_resumes(tmp_path, capsys):
    """Train a dense GQA run (no RoPE), convert its checkpoint at full rank (exact), then fine-tune the
    converted run through ``train --resume`` with the command the conversion printed."""
    import json
    import re

    from helpers import train_inprocess, train_losses
    from megatron_ext.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    assert train_inprocess(src, "--position-embedding-type", "learned_absolute", "--num-query-groups", "2",
                           "--train-iters", "10", "--eval-iters", "0") == 0
    src_losses = train_losses(src)
    capsys.readouterr()
    # head dim 16, Gs = G = 2: full rank is min(G * 2 * 16, hidden 64) = 64
    assert main(["convert", "gqa-to-gqla", "--load", str(src), "--save", str(dst), "--groups", "2",
                 "--kv-lora-rank", "64", "--eval-samples", "4"]) == 0
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"K/V relative reconstruction error ([0-9.e+-]+)", out)]
    assert len(errors) == 2 and all(e < 1e-6 for e in errors), out
    rel = float(re.search(r"relative L2 change ([0-9.e+-]+)", out).group(1))
    assert rel < 1e-5, out
    config = json.loads((dst / "config.json").read_text())
    assert (config["attention_type"], config["num_query_groups"], config["kv_lora_rank"],
            config["qk_pos_emb_head_dim"], config["gqla_latent_norm"]) == ("gqla", 2, 64, 0, False)
    command = json.loads((dst / "convert.json").read_text())["resume_command"]
    assert command[:2] == ["megatron-ext", "train"] and command[-1] == "--resume"
    assert main(command[1:] + ["--eval-iters", "0"]) == 0
    losses = train_losses(dst)
    assert len(losses) == 10
    # starts where the source stopped (the conversion is exact), well below an untrained model
    assert losses[0] < src_losses[0] - 0.5 and abs(losses[0] - src_losses[-1]) < 0.5, (src_losses, losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_convert_cli_input_errors(tmp_path, capsys):
    from megatron_ext.cli import main

    assert main(["convert", "gqa-to-gqla", "--load", str(tmp_path / "none"), "--save", str(tmp_path / "o"),
                 "--groups", "2", "--kv-lora-rank", "8"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --- MLA -> GQLA ------------------------------------------------------------------------------------

def megatron_mla(heads=8, hidden=32, dn=6, dr=4, dv=5, rank=16, q_lora=None, seed=0, norms=True):
    """Megatron's own MLASelfAttention from this project's local MLA spec (the one ``--attention-type
    mla`` trains: SDPA core attention, builds on both megatron-core versions), fp64 with fresh random
    weights, norms included."""
    import math

    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext.modules.mla import mla_spec

    cfg = compat.make_transformer_config(
        compat.mla_transformer_config_class(), num_layers=1, hidden_size=hidden, num_attention_heads=heads,
        q_lora_rank=q_lora, kv_lora_rank=rank, qk_head_dim=dn, qk_pos_emb_head_dim=dr, v_head_dim=dv,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float64, transformer_impl="local", use_cpu_initialization=True, rope_type="rope",
        apply_rope_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        multi_latent_attention=True, qk_layernorm=norms)
    torch.manual_seed(seed)
    mla = build_module(mla_spec(cfg), config=cfg, layer_number=1).to(torch.float64)
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.dim() == 1 else 1.0 / math.sqrt(p.shape[-1])))
    return mla.eval()


def _rel(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("q_lora,norms", [(None, True), (12, True), (None, False)])
def test_mla_to_gqla_is_exact_with_one_group_per_head(parallel_state, q_lora, norms):
    from megatron_ext.convert import convert_mla_to_gqla

    mla = megatron_mla(q_lora=q_lora, norms=norms)
    gqla, report = convert_mla_to_gqla(mla, groups=8, backend="torch")
    assert report.key_rel_error < 1e-6 and report.value_rel_error < 1e-6, report.line()
    x = torch.randn(10, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # 1e-7, not fp64's 1e-15: Megatron computes the RoPE angles in fp32 (without the rope part: 1e-15)
    assert _rel(mla(x, None)[0], gqla(x)[0]) < 1e-7


def test_mla_to_gqla_error_grows_as_groups_fall_and_wide_groups_are_exact(parallel_state):
    from megatron_ext.convert import convert_mla_to_gqla

    mla = megatron_mla(seed=1)
    x = torch.randn(10, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref = mla(x, None)[0]
    key_err, val_err, out_err = [], [], []
    for groups in (8, 4, 2, 1):
        gqla, report = convert_mla_to_gqla(mla, groups, backend="torch")
        key_err.append(report.key_rel_error)
        val_err.append(report.value_rel_error)
        out_err.append(_rel(ref, gqla(x)[0]))
    # nested groups: one shared subspace for a union of heads is never better than one per part
    for errs in (key_err, val_err):
        assert errs[0] < 1e-6 and all(a < b for a, b in zip(errs, errs[1:])), errs
    assert out_err[0] < 1e-7 and out_err[-1] > 0.1, out_err
    # widening each group to m heads' dims (m = 8/G) spans every head's map: exact again
    gqla, report = convert_mla_to_gqla(mla, 2, qk_head_dim=4 * 6, v_head_dim=4 * 5, backend="torch")
    assert report.key_rel_error < 1e-6 and _rel(ref, gqla(x)[0]) < 1e-7


def test_mla_to_gqla_input_errors(parallel_state):
    from megatron_ext.convert import convert_mla_to_gqla

    with pytest.raises(ValueError, match="groups=3: must divide num_attention_heads=8"):
        convert_mla_to_gqla(megatron_mla(), 3)


def test_mla_to_gqla_narrower_latent_without_the_norm(parallel_state):
    """Without the latent norm the latent is linear: a rank-R refactoring of the group maps whose error
    falls as R grows and vanishes at MLA's r; with the norm a narrower latent is refused."""
    from megatron_ext.convert import convert_mla_to_gqla

    mla = megatron_mla(seed=2, norms=False)
    x = torch.randn(10, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref = mla(x, None)[0]
    latent_err, out_err = [], []
    for rank in (4, 8, 12, 16):
        gqla, report = convert_mla_to_gqla(mla, 4, kv_lora_rank=rank, backend="torch")
        assert gqla.r_kv == rank and report.kv_lora_rank == rank
        latent_err.append(report.latent_rel_error)
        out_err.append(_rel(ref, gqla(x)[0]))
    assert all(a > b for a, b in zip(latent_err, latent_err[1:])) and latent_err[-1] < 1e-6, latent_err
    assert out_err[0] > out_err[-1], out_err
    exact, _ = convert_mla_to_gqla(mla, 8, kv_lora_rank=16, backend="torch")
    assert _rel(ref, exact(x)[0]) < 1e-7
    with pytest.raises(ValueError, match="kv_lora_rank=8: the MLA latent is normalised"):
        convert_mla_to_gqla(megatron_mla(norms=True), 4, kv_lora_rank=8)
    with pytest.raises(ValueError, match="kv_lora_rank=17: the GQLA latent is a subspace"):
        convert_mla_to_gqla(mla, 4, kv_lora_rank=17)


# --- megatron-ext train --attention-type mla, then convert mla-to-gqla ------------------------------

@pytest.mark.parametrize("overrides,world,match", [
    (dict(num_query_groups=2), 1, "num_query_groups=2: MLA has one K/V up-projection block per query head"),
    (dict(qk_pos_emb_head_dim=0), 1, "qk_pos_emb_head_dim=0: Megatron's MLA always rotates"),
    (dict(kv_lora_rank=0), 1, "kv_lora_rank=0: must be a positive integer"),
    (dict(attention_pattern="W", window_size=8), 1, "attention_type='mla': MLA layers take no sparse-MQA"),
    (dict(tensor_model_parallel_size=2, kv_lora_rank=63), 2, "kv_lora_rank=63: kv_lora_rank \\+ qk_pos_emb"),
    (dict(gqla_backend="triton"), 1, "gqla_backend='triton': MLA layers run Megatron's MLASelfAttention"),
])
def test_mla_config_errors(overrides, world, match):
    from megatron_ext.config import ConfigError, validate

    with pytest.raises(ConfigError, match=match):
        validate(from_preset("test", attention_type="mla", **overrides), world)


def test_mla_dims_are_refused_without_an_mla_or_gqla_model():
    from megatron_ext.config import ConfigError, validate

    with pytest.raises(ConfigError, match="kv_lora_rank=32: a GQLA dimension \\(MLA's too\\)"):
        validate(from_preset("test", kv_lora_rank=32), 1)


def test_mla_trains_and_converts_to_gqla(tmp_path, capsys):
    """A tiny MLA run (Megatron's MLASelfAttention) trains; ``convert mla-to-gqla`` at G = H writes a GQLA
    run whose checkpoint, loaded as GQLA, reproduces the MLA logits in fp32; G < H reports a finite
    error and loss change; bad input fails before any model is built."""
    import json
    import math
    import re

    from helpers import train_inprocess, train_losses
    from megatron_ext.cli import main
    from megatron_ext.convert.command import cpu_world_of_one, load_model, locate, read_config, validation_tokens
    from megatron_ext.modules.gqla import GQLAttention

    src, exact, grouped = tmp_path / "mla", tmp_path / "gqla4", tmp_path / "gqla2"
    assert train_inprocess(src, "--attention-type", "mla", "--train-iters", "6", "--eval-iters", "0",
                           "--log-interval", "1") == 0
    losses = train_losses(src)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    capsys.readouterr()

    # G = H = 4: one group per head, exact
    assert main(["convert", "mla-to-gqla", "--load", str(src), "--save", str(exact), "--groups", "4",
                 "--eval-samples", "4"]) == 0
    out = capsys.readouterr().out
    errors = re.findall(r"key map relative error ([0-9.e+-]+), value map ([0-9.e+-]+)", out)
    assert len(errors) == 2 and all(float(e) < 1e-6 for pair in errors for e in pair), out
    assert float(re.search(r"relative L2 change ([0-9.e+-]+)", out).group(1)) < 1e-5, out
    config = json.loads((exact / "config.json").read_text())
    assert (config["attention_type"], config["num_query_groups"], config["kv_lora_rank"],
            config["qk_pos_emb_head_dim"]) == ("gqla", 4, 64, 8)
    assert json.loads((exact / "convert.json").read_text())["resume_command"][-1] == "--resume"
    runs = [locate(str(r), None) for r in (src, exact)]
    cfgs = [read_config(run) for run, _, _ in runs]
    tokens, positions = validation_tokens(cfgs[0], 3)
    with cpu_world_of_one(cfgs[0].seed):
        mla_model, gqla_model = (load_model(c, root, it) for c, (_, root, it) in zip(cfgs, runs))
        assert type(gqla_model.decoder.layers[0].self_attention) is GQLAttention
        with torch.no_grad():
            a, b = (m(tokens, positions, None) for m in (mla_model, gqla_model))
    assert ((a - b).norm() / a.norm()).item() < 1e-5 and (a - b).abs().max().item() < 1e-4

    # G = 2 < H: the shared subspaces lose something, reported per layer and as a loss change
    assert main(["convert", "mla-to-gqla", "--load", str(src), "--save", str(grouped), "--groups", "2",
                 "--eval-samples", "4"]) == 0
    out = capsys.readouterr().out
    errors = [float(e) for pair in re.findall(r"key map relative error ([0-9.e+-]+), value map ([0-9.e+-]+)", out)
              for e in pair]
    assert len(errors) == 4 and all(0.01 < e < 1 for e in errors), out
    change = json.loads((grouped / "convert.json").read_text())["logit_change"]
    assert math.isfinite(change["loss_dst"]) and 1e-4 < change["rel_l2"] < 1, change
    assert f"loss {change['loss_src']:.4f} -> {change['loss_dst']:.4f}" in out

    # bad input: refused at argument time, nothing written
    bad = tmp_path / "bad"
    assert main(["convert", "mla-to-gqla", "--load", str(src), "--save", str(bad), "--groups", "3"]) == 2
    assert "groups=3: must divide num_attention_heads=4" in capsys.readouterr().err
    assert main(["convert", "mla-to-gqla", "--load", str(src), "--save", str(bad), "--groups", "2",
                 "--kv-lora-rank", "16"]) == 2
    assert "kv_lora_rank=16: the MLA run normalises its 64-dim latent" in capsys.readouterr().err
    assert main(["convert", "gqa-to-gqla", "--load", str(src), "--save", str(bad), "--groups", "2",
                 "--kv-lora-rank", "16"]) == 2
    assert "gqa-to-gqla converts dense GQA runs" in capsys.readouterr().err
    dense = tmp_path / "dense"
    (dense / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (dense / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("1")
    (dense / "config.json").write_text(json.dumps(dict(config, attention_type="dense", num_query_groups=None,
                                                       kv_lora_rank=None, qk_head_dim=None,
                                                       qk_pos_emb_head_dim=None, v_head_dim=None)))
    assert main(["convert", "mla-to-gqla", "--load", str(dense), "--save", str(bad), "--groups", "2"]) == 2
    err = capsys.readouterr().err
    assert "the run has attention_type='dense'" in err and "mla-to-gqla converts MLA runs" in err, err
    assert not bad.exists()


@pytest.mark.multirank
def test_convert_cli_reshards_a_tp2_checkpoint(tmp_path, capsys):
    """A run saved under TP=2 (world size 2, gloo) converts in one process: Megatron's distributed
    checkpoint reshards into the TP=1 model, and the full-rank conversion is exact on it."""
    import json
    import re

    from helpers import train_torchrun
    from megatron_ext.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    proc = train_torchrun(src, 2, "--tensor-model-parallel-size", "2", "--num-query-groups", "2",
                          "--position-embedding-type", "learned_absolute", "--train-iters", "4",
                          "--save-interval", "4", "--eval-iters", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    capsys.readouterr()
    assert main(["convert", "gqa-to-gqla", "--load", str(src / "checkpoints" / "iter_0000004"), "--save", str(dst),
                 "--groups", "2", "--kv-lora-rank", "64", "--eval-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"relative L2 change ([0-9.e+-]+)", out).group(1)) < 1e-5, out
    # trained weights, not a fresh init: the held-out loss is that of the run, well below ln(vocab)
    loss_src = float(re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out).group(1))
    assert loss_src < json.loads((src / "metrics.jsonl").read_text().splitlines()[0])["loss"], out
    config = json.loads((dst / "config.json").read_text())
    assert (config["tensor_model_parallel_size"], config["num_query_groups"]) == (2, 2)
