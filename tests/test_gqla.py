"""GQLA attention: the module against an independent per-head torch implementation (forward and
backward, fp64), both decode paths against the training forward at every position (fp64 and fp32),
cache sizes, config errors, a tiny model training on the CPU lane, and TP=2 + SP == world size 1."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import patches
from megatron_ext import compat
from megatron_ext.config import ConfigError, GQLAConfig, from_preset, validate
from tests.helpers import (cpu_model_parallel, receipt, resume_from, subprocess_env, train_inprocess,
                           train_losses)

H, HIDDEN = 4, 32


@pytest.fixture
def parallel_state():
    """Per test: the in-process training test needs model parallel uninitialised."""
    with cpu_model_parallel(11):
        yield


def make_gqla(groups, d_nope=8, d_rope=4, d_v=6, rank=12, q_lora=None, latent_norm=True,
              window=None, sinks=0, dtype=torch.float64, seed=0, tp=1, sp=False, randomize=True,
              topk=None, kl_coeff=0.5):
    from megatron_ext.modules.gqla import GQLASelfAttentionSubmodules, GQLAttention
    from megatron_ext.modules.norm import Norm

    cfg = compat.make_transformer_config(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=H, num_query_groups=groups,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, transformer_impl="local", params_dtype=dtype,
        tensor_model_parallel_size=tp, sequence_parallel=sp)
    cfg.gqla = GQLAConfig(num_query_groups=groups, kv_lora_rank=rank, qk_head_dim=d_nope,
                          qk_pos_emb_head_dim=d_rope, v_head_dim=d_v, q_lora_rank=q_lora,
                          latent_norm=latent_norm, window_size=window, num_sink_tokens=sinks,
                          # 16 index heads: a score is 0 (a tie the selection may break either way,
                          # differently for a prompt and the full sequence) only if all 16 ReLUs are
                          backend="torch", topk=topk, indexer_num_heads=16, indexer_head_dim=8,
                          indexer_kl_coeff=kl_coeff)
    torch.manual_seed(seed)
    module = GQLAttention(cfg, GQLASelfAttentionSubmodules(q_layernorm=Norm, kv_layernorm=Norm)).to(dtype)
    with torch.no_grad():  # fresh random weights everywhere, norms included (not the ones init)
        for p in module.parameters() if randomize else ():
            p.copy_(torch.randn_like(p) * (1.0 if p.dim() == 1 else 1.0 / math.sqrt(p.shape[-1])))
    return module.eval()


# ------------------------------------------------------------------------------------------------
# independent reference: per-head K/V materialised, RoPE as complex rotation, explicit softmax


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_complex(x, positions, base=10000.0):
    """x [s, ..., d]: pairs (i, i + d/2) as complex numbers times exp(i * pos * theta_i)."""
    d = x.shape[-1]
    half = d // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    ang = positions.double()[:, None] * theta[None]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(ang), ang).view(shape)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_forward(m, hidden, window=None, sinks=0, selected=None):
    """hidden [s, b, h] -> [s, b, h] from the module's weights, one head at a time; ``selected [b, s,
    s]`` bool: a top-k layer's chosen keys (united with the window and sinks, as in the op)."""
    g = m.gqla
    s, b, _ = hidden.shape
    dn, dr, dv, r, G = g.qk_head_dim, g.qk_pos_emb_head_dim, g.v_head_dim, g.kv_lora_rank, g.num_query_groups
    pos = torch.arange(s)
    if g.q_lora_rank is None:
        q = hidden @ m.linear_q_proj.weight.T
    else:
        q = _rms(hidden @ m.linear_q_down_proj.weight.T, m.q_layernorm.weight) @ m.linear_q_up_proj.weight.T
    q = q.view(s, b, H, dn + dr)
    kv = hidden @ m.linear_kv_down_proj.weight.T
    c, kr = kv[..., :r], kv[..., r:]
    if g.latent_norm:
        c = _rms(c, m.kv_layernorm.weight)
    if dr:
        kr = _rope_complex(kr, pos)
    w_up = m.linear_kv_up_proj.weight.view(G, dn + dv, r)
    i, j = pos[:, None], pos[None, :]
    allowed = j <= i
    if selected is not None:
        extra = j < sinks
        if window is not None:
            extra = extra | (i - j < window)
        allowed = allowed & (extra | selected)                          # [b, s, s]
    elif window is not None:
        allowed = allowed & ((i - j < window) | (j < sinks))
    heads = []
    for h in range(H):
        grp = h // (H // G)
        qh = q[:, :, h]
        if dr:
            qh = torch.cat([qh[..., :dn], _rope_complex(qh[..., dn:], pos)], dim=-1)
        kh = torch.cat([c @ w_up[grp, :dn].T, kr], dim=-1)            # [s, b, dn + dr]
        vh = c @ w_up[grp, dn:].T                                       # [s, b, dv]
        scores = torch.einsum("ibd,jbd->bij", qh, kh) / math.sqrt(dn + dr)
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        heads.append(torch.einsum("bij,jbd->ibd", p, vh))
    return torch.cat(heads, dim=-1) @ m.linear_proj.weight.T


CASES = [  # (G, q_lora, latent_norm, d_rope): G=1 is MQA over the latent, G=H is MLA
    (1, None, True, 4), (2, None, True, 4), (4, 6, True, 4), (2, 6, False, 0), (4, None, False, 4)]


@pytest.mark.parametrize("groups,q_lora,latent_norm,d_rope", CASES)
def test_forward_backward_match_per_head_reference(parallel_state, groups, q_lora, latent_norm, d_rope):
    m = make_gqla(groups, d_rope=d_rope, q_lora=q_lora, latent_norm=latent_norm)
    x = torch.randn(7, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    out, bias = m(x)
    assert bias is None and out.shape == x.shape
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_forward(m, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(out, [x] + params, dout)
    grads_ref = torch.autograd.grad(ref, [x_ref] + params, dout)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_window_and_sinks_match_reference(parallel_state):
    m = make_gqla(2, window=3, sinks=1)
    x = torch.randn(9, 2, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], reference_forward(m, x, window=3, sinks=1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 3])
def test_decode_paths_equal_training_forward_at_every_position(parallel_state, dtype, tol, groups, window):
    m = make_gqla(groups, q_lora=6 if groups == 2 else None, window=window, sinks=1 if window else 0,
                  dtype=dtype, seed=groups)
    s, b, prompt = 9, 3, 4
    x = torch.randn(s, b, HIDDEN, dtype=dtype)
    with torch.no_grad():
        full = m(x)[0]
    for path in ("gqa", "absorb"):
        cache = m.init_cache(b, s, path=path)
        pre = m.prefill(x[:prompt], cache)[0]
        torch.testing.assert_close(pre, full[:prompt], rtol=tol, atol=tol)
        for t in range(prompt, s):
            step = m.decode_step(x[t:t + 1], cache, t)[0]
            torch.testing.assert_close(step[0], full[t], rtol=tol, atol=tol, msg=f"{path} position {t}")
        assert cache.length == s


def _selected_mask(topk, s):
    """``topk [b, s, G, k]`` (-1 padded) -> bool ``[b, s, s]`` of the keys listed for each query."""
    idx = topk[:, :, 0].long()
    hit = torch.zeros(idx.shape[0], s, s + 1, dtype=torch.bool)
    hit.scatter_(2, torch.where(idx < 0, s, idx), True)
    return hit[..., :s]


@pytest.mark.parametrize("groups,window,sinks", [(1, None, 0), (2, 3, 1), (4, None, 2)])
def test_topk_forward_backward_match_per_head_reference(parallel_state, groups, window, sinks):
    """Sparse GQLA with the lightning indexer's top-k keys (3 per query) == the per-head reference
    over the same keys, forward and every gradient, fp64."""
    m = make_gqla(groups, window=window, sinks=sinks, topk=3, seed=groups)
    s = 11
    x = torch.randn(s, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        selected = _selected_mask(m.indexer(x), s)
    assert not selected.all(dim=-1).any()  # really sparse: no query row sees every key by selection
    out = m(x)[0]
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_forward(m, x_ref, window=window, sinks=sinks, selected=selected)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    params = [p for n, p in m.named_parameters() if not n.startswith("indexer.")]
    grads = torch.autograd.grad(out, [x] + params, dout)
    grads_ref = torch.autograd.grad(ref, [x_ref] + params, dout)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_topk_indexer_learns_from_its_kl_only(parallel_state):
    """In training the KL reaches the indexer's weights and nothing else: the input and main-weight
    gradients equal those of the same step without the KL (eval mode attaches none)."""
    from megatron_ext.modules import indexer as hooks

    m = make_gqla(2, window=3, sinks=1, topk=3, seed=5)
    x = torch.randn(9, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(9, 2, HIDDEN, dtype=torch.float64)
    main = [p for n, p in m.named_parameters() if not n.startswith("indexer.")]
    grads_eval = torch.autograd.grad(m(x)[0], [x] + main, dout)
    m.train()
    hooks.begin_step(1)
    out = m(x)[0]
    grads = torch.autograd.grad(out, [x] + main + list(m.indexer.parameters()), dout)
    for got, want in zip(grads[:len(main) + 1], grads_eval):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    index_grads = grads[len(main) + 1:]
    assert all(torch.isfinite(g).all() for g in index_grads)
    assert index_grads[0].abs().sum() > 0  # linear_q: the KL's gradient
    assert hooks.indexer_loss_values()  # the KL was recorded for the metrics


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 3])
def test_topk_decode_paths_equal_training_forward(parallel_state, groups, window):
    """Both decode paths of a top-k layer select keys from the cached index keys exactly as the
    training forward does, and equal it at every position (fp64)."""
    from megatron_ext import backends

    m = make_gqla(groups, window=window, sinks=1, topk=2, seed=10 + groups)
    s, b, prompt = 10, 2, 4
    x = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)[0]
    for path in ("gqa", "absorb"):
        cache = m.init_cache(b, s, path=path)
        torch.testing.assert_close(m.prefill(x[:prompt], cache)[0], full[:prompt], rtol=1e-10, atol=1e-10)
        for t in range(prompt, s):
            step = m.decode_step(x[t:t + 1], cache, t)[0]
            torch.testing.assert_close(step[0], full[t], rtol=1e-10, atol=1e-10, msg=f"{path} position {t}")
        assert cache.nbytes() == b * s * m.cache_bytes_per_token(path)
    assert any(r["op"] == "gqla.decode" and r["observed"] == "torch" for r in backends.records())


def test_cache_bytes_per_token(parallel_state):
    m = make_gqla(2, d_nope=8, d_rope=4, d_v=6, rank=12)
    assert m.cache_bytes_per_token("gqa") == 8 * (2 * (8 + 6) + 4)  # fp64: G*(d_nope + d_v) + d_rope
    assert m.cache_bytes_per_token("absorb") == 8 * (12 + 4)        # r_kv + d_rope
    assert m.cache_bytes_per_token("absorb", torch.bfloat16) == 2 * 16
    for path in ("gqa", "absorb"):
        cache = m.init_cache(2, 10, path=path)
        assert cache.nbytes() == 2 * 10 * m.cache_bytes_per_token(path)
    with pytest.raises(ValueError, match="path='mla'"):
        m.init_cache(2, 10, path="mla")


def test_decode_input_errors(parallel_state):
    m = make_gqla(2)
    cache = m.init_cache(2, 4, path="absorb")
    x = torch.randn(1, 2, HIDDEN, dtype=torch.float64)
    with pytest.raises(ValueError, match="position=2: decode appends at cache.length=0"):
        m.decode_step(x, cache, 2)
    for t in range(4):
        m.decode_step(x, cache, t)
    with pytest.raises(ValueError, match="max_len=4"):
        m.decode_step(x, cache, 4)
    with pytest.raises(ValueError, match="prefill starts an empty cache"):
        m.prefill(x, cache)


# ------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("fields,match", [
    (dict(num_query_groups=3), "num_query_groups=3: GQLA groups must divide num_attention_heads=4"),
    (dict(qk_pos_emb_head_dim=3), "qk_pos_emb_head_dim=3: RoPE rotates pairs"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0: must be a positive integer"),
    (dict(backend="cuda"), "gqla_backend='cuda'"),
])
def test_gqla_config_errors(fields, match):
    base = dict(num_query_groups=2, kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8)
    with pytest.raises(ConfigError, match=match):
        GQLAConfig(**{**base, **fields}).validate(4, 1)


def test_gqla_config_tp_errors():
    cfg = GQLAConfig(num_query_groups=2, kv_lora_rank=7, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4: GQLA shards its num_query_groups=2"):
        cfg.validate(8, 4)
    with pytest.raises(ConfigError, match="kv_lora_rank=7: kv_lora_rank \\+ qk_pos_emb_head_dim = 11"):
        cfg.validate(8, 2)


def test_train_config_gqla_errors():
    ok = from_preset("test", attention_type="gqla", num_query_groups=2)
    assert validate(ok, 1) == 1
    with pytest.raises(ConfigError, match="kv_lora_rank=16: a GQLA dimension"):
        validate(from_preset("test", kv_lora_rank=16), 1)
    assert validate(from_preset("test", attention_type="mla"), 1) == 1  # Megatron's MLA (modules/mla.py)
    with pytest.raises(ConfigError, match="attention_type='sparse'"):
        validate(from_preset("test", attention_type="sparse"), 1)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4: GQLA shards"):
        validate(from_preset("test", attention_type="gqla", num_query_groups=2, tensor_model_parallel_size=4), 4)


def test_window_and_sink_flags_reach_gqla():
    """``--window-size`` / ``--num-sink-tokens`` mean for GQLA what they mean for sparse-MQA layers."""
    from megatron_ext.config import gqla_config
    from megatron_ext.training.model import transformer_config

    cfg = from_preset("test", attention_type="gqla", num_query_groups=2, window_size=16, num_sink_tokens=2)
    assert validate(cfg, 1) == 1
    assert (gqla_config(cfg).window_size, gqla_config(cfg).num_sink_tokens) == (16, 2)
    tconfig = transformer_config(cfg, "cpu", False)
    assert (tconfig.gqla.window_size, tconfig.gqla.num_sink_tokens) == (16, 2)
    assert tconfig.sparse_attention is None
    with pytest.raises(ConfigError, match="window_size=0: the window counts the query itself"):
        validate(from_preset("test", attention_type="gqla", window_size=0), 1)
    with pytest.raises(ConfigError, match="learnable_sink=True: GQLA layers"):
        validate(from_preset("test", attention_type="gqla", window_size=16, learnable_sink=True), 1)
    topk = from_preset("test", attention_type="gqla", num_query_groups=2, sparse_topk=8, indexer_head_dim=16)
    assert validate(topk, 1) == 1
    assert (gqla_config(topk).topk, gqla_config(topk).indexer_head_dim) == (8, 16)
    for extra, match in (({"sparse_topk": 0}, "sparse_topk=0: must be positive"),
                         ({"sparse_topk": 4, "indexer_num_heads": 0}, "indexer_num_heads=0: must be positive")):
        with pytest.raises(ConfigError, match=match):
            validate(from_preset("test", attention_type="gqla", **extra), 1)


# ------------------------------------------------------------------------------------------------
# a model on the CPU lane

GQLA = ["--attention-type", "gqla", "--num-query-groups", "2", "--kv-lora-rank", "32",
        "--qk-pos-emb-head-dim", "8", "--gqla-backend", "torch"]


def test_gqla_model_trains(tmp_path):
    run = tmp_path / "gqla"
    assert train_inprocess(run, *GQLA, "--q-lora-rank", "32", "--train-iters", "16", "--eval-iters", "0",
                           "--window-size", "24", "--num-sink-tokens", "2") == 0
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.5, losses
    assert receipt(run)["lane"]["tp"] == 1
    assert (receipt(run)["config"]["window_size"], receipt(run)["config"]["num_sink_tokens"]) == (24, 2)


def test_topk_gqla_model_trains_and_resumes(tmp_path):
    """Sparse GQLA (window + sinks + learned top-k) trains on the CPU lane, logs the indexer's KL, and
    a resume from its step-4 checkpoint (indexer weights included) repeats steps 5-8 exactly."""
    run = tmp_path / "gqla_topk"
    flags = [*GQLA, "--train-iters", "8", "--eval-iters", "0", "--lr-warmup-iters", "0",
             "--window-size", "8", "--num-sink-tokens", "2", "--sparse-topk", "4", "--save-interval", "4"]
    assert train_inprocess(run, *flags) == 0
    losses = train_losses(run)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("indexer" in json.dumps(r) for r in rows), rows[-1]
    resumed = resume_from(run, tmp_path / "resumed", 4)
    assert train_inprocess(resumed, *flags, "--resume") == 0
    torch.testing.assert_close(train_losses(resumed)[4:], losses[4:], rtol=1e-6, atol=1e-6)


@pytest.mark.multirank
def test_tp2_and_sequence_parallel_equal_world_size_1():
    """One torchrun spawn (this file as the worker): TP=2 without and with SP, the sharded module's
    output, input gradient and every parameter-shard gradient equal the world-size-1 reference on the
    gathered weights; both decode paths at TP=2 equal it at every position."""
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("GQLA-TP-OK") == 2, proc.stdout[-2000:]


def _tp_worker():
    import types

    import torch.distributed as dist

    dist.init_process_group("gloo")
    patches.apply_patches("cpu")
    compat.initialize_model_parallel(2, 1, 1)
    compat.seed_model_parallel(5)
    rank, tp = dist.get_rank(), 2
    for sp, q_lora, topk in ((False, None, None), (True, 6, None), (False, None, 3), (True, None, 3)):
        sparse = dict(window=3, sinks=1, topk=topk) if topk else {}
        m = make_gqla(2, q_lora=q_lora, tp=tp, sp=sp, randomize=False, **sparse)
        gen = torch.Generator().manual_seed(17)
        full, local = {}, {}
        for name, p in m.named_parameters():
            dim = getattr(p, "partition_dim", 0) if getattr(p, "tensor_model_parallel", False) else None
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            w = torch.randn(shape, generator=gen, dtype=torch.float64) / (1 if len(shape) == 1 else math.sqrt(shape[-1]))
            full[name] = w.clone().requires_grad_(True)
            local[name] = dim
            with torch.no_grad():
                p.copy_(w if dim is None else w.chunk(tp, dim=dim)[rank])
        ref_mod = types.SimpleNamespace(gqla=m.gqla)
        for name, w in full.items():
            owner, attr = name.rsplit(".", 1)
            setattr(ref_mod, owner, types.SimpleNamespace(**{**getattr(ref_mod, owner, types.SimpleNamespace()).__dict__,
                                                            attr: w}))
        x = torch.randn(8, 2, HIDDEN, generator=gen, dtype=torch.float64)
        dout = torch.randn(8, 2, HIDDEN, generator=gen, dtype=torch.float64)
        shard = (lambda t: t.chunk(tp, dim=0)[rank]) if sp else (lambda t: t)
        x_ref = x.clone().requires_grad_(True)
        selected = None
        if topk:  # the replicated indexer's choice over the whole sequence (it gathers an SP shard)
            with torch.no_grad():
                selected = _selected_mask(m.indexer(shard(x)), x.shape[0])
        ref = reference_forward(ref_mod, x_ref, window=sparse.get("window"), sinks=sparse.get("sinks", 0),
                                selected=selected)
        ref.backward(dout)
        x_loc = shard(x).clone().requires_grad_(True)
        out = m(x_loc)[0]
        out.backward(shard(dout))
        torch.testing.assert_close(out, shard(ref), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x_loc.grad, shard(x_ref.grad), rtol=1e-9, atol=1e-10)
        for name, p in m.named_parameters():
            if name.startswith("indexer."):  # learns from its KL only (not attached in eval mode)
                continue
            dim, want = local[name], full[name].grad
            want = want if dim is None else want.chunk(tp, dim=dim)[rank]
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-10, msg=f"sp={sp} {name}")
        if not sp:
            with torch.no_grad():
                for path in ("gqa", "absorb"):
                    cache = m.init_cache(2, 8, path=path)
                    m.prefill(x[:3], cache)
                    for t in range(3, 8):
                        step = m.decode_step(x[t:t + 1], cache, t)[0]
                        torch.testing.assert_close(step[0], ref[t], rtol=1e-10, atol=1e-10,
                                                   msg=f"topk={topk} {path} position {t}")
    print("GQLA-TP-OK", flush=True)
    compat.destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# GPU: bf16 through the Triton kernels (head dims padded to a tile) against the fp64 reference


@pytest.fixture
def cuda_parallel_state():
    """World size 1 on gloo with model parallel initialised, for the GPU tests (skips without CUDA)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    import torch.distributed as dist

    from megatron_ext.training.distributed import free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    compat.initialize_model_parallel(1, 1, 1)
    try:
        yield
    finally:
        compat.destroy_model_parallel(destroy_groups=True)


@pytest.mark.gpu
def test_gqla_bf16_cuda_matches_reference(cuda_parallel_state):
    m = make_gqla(2, d_nope=48, d_rope=16, d_v=32, rank=64, dtype=torch.float64).cuda()
    x = torch.randn(256, 2, HIDDEN, dtype=torch.float64, device="cuda")
    ref = reference_forward(m.cpu(), x.cpu()).cuda()
    m = m.cuda().to(torch.bfloat16)
    m.gqla = dataclasses.replace(m.gqla, backend="triton")
    out = m(x.to(torch.bfloat16))[0].double()
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    cache = m.init_cache(2, 256, path="absorb")
    m.prefill(x[:255].to(torch.bfloat16), cache)
    step = m.decode_step(x[255:].to(torch.bfloat16), cache, 255)[0].double()
    torch.testing.assert_close(step[0], ref[255], rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 40])
def test_gqla_bf16_cuda_kernel_decode_equals_training_forward(cuda_parallel_state, window):
    """Both decode paths through the Triton split-KV kernel (backend "auto" on CUDA) against the bf16
    training forward, position by position, at GQLA's real head-dim split (128 + 64, r_kv 512 ->
    absorbed keys 512 + 64)."""
    from megatron_ext import backends

    m = make_gqla(4, d_nope=128, d_rope=64, d_v=128, rank=512, window=window, sinks=4 if window else 0,
                  dtype=torch.float32)
    m = m.cuda().to(torch.bfloat16)
    m.gqla = dataclasses.replace(m.gqla, backend="auto")
    s, b, prompt = 300, 3, 290
    x = torch.randn(s, b, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full = m(x)[0].float()
    bound = 0.03 * full.abs().max().item()
    for path in ("gqa", "absorb"):
        cache = m.init_cache(b, s, path=path)
        m.prefill(x[:prompt], cache)
        for t in range(prompt, s):
            step = m.decode_step(x[t:t + 1], cache, t)[0].float()
            torch.testing.assert_close(step[0], full[t], rtol=0.03, atol=bound, msg=f"{path} position {t}")
    assert any(r["op"] == "gqla.decode" and r["observed"] == "triton" for r in backends.records())


@pytest.mark.gpu
def test_gqla_topk_bf16_cuda_triton_matches_torch(cuda_parallel_state):
    """Sparse GQLA with top-k on the GPU: the Triton top-k + window kernels against the torch
    reference op on the same bf16 module and the same indexer selection, forward and backward."""
    m = make_gqla(4, d_nope=64, d_rope=32, d_v=64, rank=128, window=64, sinks=4, topk=32,
                  dtype=torch.float32).cuda().to(torch.bfloat16)
    x = torch.randn(512, 2, HIDDEN, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    results = []
    for backend in ("torch", "triton"):
        m.gqla = dataclasses.replace(m.gqla, backend=backend)
        xi = x.clone().requires_grad_(True)
        out = m(xi)[0]
        out.backward(dout)
        results.append((out.float(), xi.grad.float(), m.linear_kv_up_proj.weight.grad.float().clone()))
        m.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.03 * want.abs().max().item())


if __name__ == "__main__":
    _tp_worker()
