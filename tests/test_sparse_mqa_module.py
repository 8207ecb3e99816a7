"""SparseMQAttention as a Megatron module: forward and backward against an independent composition
(the same weights, Megatron's fused-QKV layout unpacked by hand, RoPE written out, the torch
reference op), the per-layer pattern, streaming decode against the full forward at every position,
training on the CPU lane (alone and inside mHC), TP=2 + SP against world size 1, and config errors.
"""

import pytest
import torch

from megatron_ext import compat
from megatron_ext.config import SparseAttentionConfig
from tests.helpers import cpu_model_parallel, receipt, train_inprocess, train_losses, train_torchrun

# Training runs pin the torch op: kernel tests switch the Triton interpreter on process-wide, and
# the interpreter is far too slow for a model (the kernels are tested in test_ops_sparse_attention).
SPARSE = ["--window-size", "16", "--num-sink-tokens", "2", "--sparse-attention-backend", "torch"]


# In-process training runs first: each sets up and tears down its own process group, which must
# not overlap the module-scoped world-size-1 group of the tests below.


def test_sparse_model_trains(tmp_path):
    run = tmp_path / "sparse"
    assert train_inprocess(run, "--attention-pattern", "W", *SPARSE, "--train-iters", "12", "--eval-iters", "0") == 0
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 1.5
    assert any(r["op"] == "sparse_attention" for r in receipt(run)["backends"])


def test_sparse_mqa_inside_mhc_trains(tmp_path):
    run = tmp_path / "sparse_mhc"
    assert train_inprocess(run, "--mhc-num-streams", "4", "--mhc-backend", "torch", "--attention-pattern", "WT",
                           "--sparse-topk", "4", "--num-query-groups", "1", "--learnable-sink", *SPARSE,
                           "--train-iters", "12", "--eval-iters", "0") == 0
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 1.5


@pytest.mark.multirank
def test_tp2_sequence_parallel_mqa_matches_world_size_1(tmp_path):
    """One KV head at TP=2 (Megatron all-gathers the fused QKV; the KV gradient comes back through
    the all-gather's reduce-scatter), sink logits split over TP, SP on, one layer of each letter
    (the T layer's indexer replicated over TP): losses equal world size 1."""
    model = ["--num-layers", "3", "--attention-pattern", "DWT", "--sparse-topk", "4", "--num-query-groups", "1",
             "--learnable-sink", *SPARSE,
             "--train-iters", "6", "--eval-iters", "0", "--lr-warmup-iters", "1"]
    ws1 = tmp_path / "ws1"
    assert train_inprocess(ws1, *model, "--make-vocab-size-divisible-by", "256") == 0
    tp2 = tmp_path / "tp2sp"
    proc = train_torchrun(tp2, 2, *model, "--tensor-model-parallel-size", "2", "--sequence-parallel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tp2) == pytest.approx(train_losses(ws1), rel=2e-5)
    lane = receipt(tp2)["lane"]
    assert (lane["tp"], lane["sp"], lane["world_size"]) == (2, True, 2)


TOPK = ["--sparse-topk", "4", "--num-query-groups", "1", "--indexer-num-heads", "2", "--indexer-head-dim", "16",
        "--window-size", "8", "--num-sink-tokens", "2", "--sparse-attention-backend", "torch",
        "--eval-iters", "0", "--lr-warmup-iters", "1"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """One folder for the top-k runs, so they share one tokenised data cache."""
    return tmp_path_factory.mktemp("topk_runs")


def _rows(run, kind):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == kind]


def test_topk_indexer_warmup_kl_metrics_and_selective_recompute(runs_root):
    """T layers: dense main attention for the first 3 iterations, top-k from iteration 4; the
    indexer's KL is logged every step. Under selective recompute of the core attention (whose first
    pass runs without grad) the KL must still train the indexer: the same KL values and losses."""
    runs = {}
    for name, extra in (("plain", ()), ("selective", ("--recompute-granularity", "selective"))):
        run = runs[name] = runs_root / name
        assert train_inprocess(run, "--attention-pattern", "T", *TOPK, "--indexer-dense-warmup-iters", "3",
                               "--train-iters", "6", *extra) == 0
    rows = _rows(runs["plain"], "indexer")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in rows] == ["dense_warmup"] * 3 + ["sparse"] * 3  # switches at iteration 4
    kl = [r["kl"][layer] for r in rows for layer in ("1", "2")]
    assert all(0 < v < 50 for v in kl)
    assert len(set(kl)) == len(kl)  # the indexer moves every step
    recomputed = _rows(runs["selective"], "indexer")
    assert [r["stage"] for r in recomputed] == [r["stage"] for r in rows]
    assert [r["kl"][layer] for r in recomputed for layer in ("1", "2")] == pytest.approx(kl, rel=1e-6)
    assert train_losses(runs["selective"]) == pytest.approx(train_losses(runs["plain"]), rel=1e-6)


def test_topk_run_resumes_onto_the_same_curve(runs_root):
    """WT: only layer 2 has an indexer (checkpoint key ...indexer.layer_2.*); a run killed after
    iteration 4 (last checkpoint 3) and resumed reproduces the uninterrupted losses and KL values,
    so the indexer weights and their optimizer state came back."""
    model = ["--attention-pattern", "WT", *TOPK, "--indexer-dense-warmup-iters", "2", "--train-iters", "6",
             "--save-interval", "3"]
    full = runs_root / "full"
    assert train_inprocess(full, *model) == 0
    killed = runs_root / "killed"
    assert train_inprocess(killed, *model, "--exit-after-iters", "4") == 0
    assert train_inprocess(killed, *model, "--resume") == 0
    assert train_losses(killed) == pytest.approx(train_losses(full), rel=1e-5, abs=1e-6)
    got, want = ([(r["step"], r["stage"], r["kl"]["2"]) for r in _rows(run, "indexer")] for run in (killed, full))
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(want) == 6
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--attention-pattern", "W", "--window-size", "0"], "window_size=0: the window counts the query itself"),
    (["--attention-pattern", "W", "--window-size", "8", "--num-sink-tokens", "-1"], "num_sink_tokens=-1"),
    (["--attention-pattern", "W"], "window_size=None: attention_pattern='W' has windowed (W) layers"),
    (["--attention-pattern", "WX", "--window-size", "8"], "attention_pattern='WX': one letter per layer"),
    (["--attention-pattern", "T", "--sparse-topk", "0"], "sparse_topk=0: must be positive"),
    (["--attention-pattern", "T"], "sparse_topk=None"),
    (["--attention-pattern", "D", "--num-attention-heads", "4", "--num-query-groups", "3"],
     "num_query_groups=3: must divide num_attention_heads=4"),
    (["--attention-pattern", "W", "--window-size", "8", "--context-parallel-size", "2"],
     "context_parallel_size=2: sparse attention has no context parallelism"),
    (["--attention-pattern", "W", "--window-size", "8", "--no-sparse-attention"], "sparse_attention=False"),
    (["--window-size", "8"], "attention_pattern=None: window/sink/top-k options need sparse attention on"),
    (["--sparse-attention", "--window-size", "8", "--sparse-attention-backend", "fast"],
     "sparse_attention_backend='fast': unknown backend"),
    (["--sparse-attention", "--window-size", "8", "--sparse-attention-backend", "triton",
      "--hidden-size", "96"], "head_dim=24 has no Triton tile"),
])
def test_sparse_config_errors(tmp_path, capsys, argv, message):
    from megatron_ext.cli import main

    assert main(["train", "--preset", "test", "--runs-root", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def parallel_state():
    with cpu_model_parallel(11):
        yield


def _config(sparse, heads=4, groups=1, hidden=32, layers=4):
    cfg = compat.make_transformer_config(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=2 * hidden, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, transformer_impl="local", bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, params_dtype=torch.float64)
    cfg.sparse_attention = sparse
    return cfg


def _attention(cfg, layer_number=1):
    from megatron.core.transformer.spec_utils import build_module

    from layer_specs.gpt import attention_spec_for

    module = build_module(attention_spec_for(cfg, layer_number), config=cfg, layer_number=layer_number)
    return module.double()


def _rope_table(s, d, base=10000.0):
    """Megatron's non-interleaved RoPE table [s, 1, 1, d]: angles repeated over the two halves."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    return torch.cat([ang, ang], dim=-1).view(s, 1, 1, d)


def _rotate(x, table):
    """x [s, b, heads, d] rotated by position: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    d = x.shape[-1]
    cos, sin = table[..., : d // 2].cos(), table[..., : d // 2].sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _reference(module, hidden, table, sink_logits, **pattern):
    """The module's math from its weights, written without Megatron's attention code."""
    return _reference_parts(module, hidden, table, sink_logits, **pattern)[0]


_LAYER = object()


def _reference_parts(module, hidden, table, sink_logits, window=_LAYER, sinks=_LAYER, topk=_LAYER):
    """(output, q, k) with q/k ``[b, s, heads, d]`` after RoPE; window/sinks/topk default to the
    layer's own pattern (topk: the indexer's choice in the module's forward)."""
    from megatron_ext.ops.sparse_attention import sparse_attention_reference

    cfg = module.config
    hq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    s, b, _ = hidden.shape
    mixed = hidden @ module.linear_qkv.weight.t()                       # [s, b, ng*(hq/ng+2)*d]
    mixed = mixed.view(s, b, ng, (hq // ng + 2) * d)
    q, k, v = mixed.split([hq // ng * d, d, d], dim=-1)
    q = q.reshape(s, b, hq, d)
    q, k = _rotate(q, table), _rotate(k, table)
    core = module.core_attention
    if topk is _LAYER:
        topk = core.topk_indices if core.letter == "T" else None  # the indexer's choice in the forward
    window = core.window_size if window is _LAYER else window
    sinks = core.num_sink_tokens if sinks is _LAYER else sinks
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out = sparse_attention_reference(q, k, v, window_size=window, num_sink_tokens=sinks,
                                     sink_logits=sink_logits, topk_indices=topk)
    return out.transpose(0, 1).reshape(s, b, hq * d) @ module.linear_proj.weight.t(), q, k


CASES = [  # (letter, window, sinks, learnable sink, hq, groups)
    ("W", 5, 2, False, 4, 1),
    ("W", 3, 0, True, 4, 2),
    ("W", 1, 3, True, 4, 4),
    ("D", None, 0, False, 4, 1),   # dense without a sink goes through SDPA
    ("D", 5, 2, True, 4, 1),       # D ignores the window and sinks, keeps the learnable sink
    ("T", 3, 1, True, 4, 1),       # top-k from the lightning indexer, united with window and sinks
]


@pytest.mark.parametrize("letter,window,sinks,learnable,hq,groups", CASES)
def test_module_matches_reference_composition_fwd_bwd(parallel_state, letter, window, sinks, learnable, hq, groups):
    sparse = SparseAttentionConfig(pattern=letter, window_size=window, num_sink_tokens=sinks,
                                   learnable_sink=learnable, topk=3, backend="torch")
    module = _attention(_config(sparse, heads=hq, groups=groups))
    assert module.letter == letter and module.core_attention.window_size == (None if letter == "D" else window)
    if learnable:
        with torch.no_grad():  # away from the zero init so the sink term matters
            module.core_attention.sink_logits.copy_(torch.randn(hq))
    s, b, h = 13, 2, module.config.hidden_size
    hidden = torch.randn(s, b, h, dtype=torch.float64, requires_grad=True)
    table = _rope_table(s, module.config.kv_channels)
    out, bias = module(hidden, None, rotary_pos_emb=table)
    assert bias is None and out.shape == (s, b, h)
    sink = module.core_attention.sink_logits
    ref = _reference(module, hidden, table, sink.double() if sink is not None else None)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [hidden, module.linear_qkv.weight, module.linear_proj.weight] + ([sink] if learnable else [])
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad_out, retain_graph=True)
    want = torch.autograd.grad(ref, params, grad_out)
    for name, g, w in zip(["hidden", "linear_qkv", "linear_proj", "sink_logits"], got, want):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)
    if letter == "T":  # the indexer picked keys outside the window, and learns from its KL loss only
        topk = module.core_attention.topk_indices
        assert topk.shape == (b, s, groups, 3) and (topk >= 0).any()
        out.backward(grad_out)
        assert module.indexer.linear_q.weight.grad.abs().sum() > 0


def test_topk_layer_dense_warmup_then_topk_and_the_indexer_learns_only_from_its_kl(parallel_state):
    """During the indexer's dense warm-up a T layer is dense causal attention (+ its learnable sink);
    afterwards it attends the indexer's top-k united with window and sinks. In both stages the main
    weights and the input get exactly the gradients of the attention without an indexer, and the
    indexer gets exactly ``coeff * d KL`` (dense KL in the warm-up, over the selected keys after)."""
    from megatron_ext.modules import indexer as hooks
    from megatron_ext.ops.sparse_attention.indexer import indexer_kl_loss

    sparse = SparseAttentionConfig(pattern="T", window_size=3, num_sink_tokens=1, learnable_sink=True, topk=3,
                                   indexer_num_heads=2, indexer_head_dim=8, indexer_kl_coeff=0.5,
                                   indexer_dense_warmup_iters=2, backend="torch")
    module = _attention(_config(sparse, groups=2))
    with torch.no_grad():
        module.core_attention.sink_logits.copy_(torch.randn(4))
    s, b = 13, 2
    table = _rope_table(s, module.config.kv_channels)
    sink = module.core_attention.sink_logits
    main = [module.linear_qkv.weight, module.linear_proj.weight, sink]
    indexer = list(module.indexer.parameters())
    try:
        for step, dense in ((1, True), (2, True), (3, False)):
            hooks.begin_step(step)
            assert module.indexer.dense_warmup is dense
            hidden = torch.randn(s, b, module.config.hidden_size, dtype=torch.float64, requires_grad=True)
            module.zero_grad()
            out, _ = module(hidden, None, rotary_pos_emb=table)
            pattern = {"window": None, "sinks": 0, "topk": None} if dense else {}
            ref, q, k = _reference_parts(module, hidden, table, sink, **pattern)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
            if not dense:  # the top-k really differs from dense attention here
                dense_out = _reference_parts(module, hidden, table, sink, window=None, sinks=0, topk=None)[0]
                assert (out - dense_out).abs().max() > 1e-3
            grad_out = torch.randn_like(out)
            out.backward(grad_out)
            want = torch.autograd.grad(ref, [hidden, *main], grad_out)
            for name, p, w in zip(["hidden", "linear_qkv", "linear_proj", "sink_logits"], [hidden, *main], want):
                torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-11, msg=name)
            q_idx, k_idx, w_idx = module.indexer.index_inputs(hidden.detach(), table)
            topk = None if dense else module.core_attention.topk_indices
            kl = indexer_kl_loss(q, k, q_idx, k_idx, w_idx, topk)
            want = torch.autograd.grad(0.5 * kl, indexer)
            for p, w in zip(indexer, want):
                assert p.grad.abs().sum() > 0
                torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
        values = hooks.indexer_loss_values()
        assert set(values) == {1} and values[1] > 0
    finally:
        hooks.begin_step(0)
        hooks.indexer_loss_values()


def test_indexer_without_kl_is_frozen_and_the_overlapped_grad_reduce_runs(parallel_state):
    """``indexer_kl_coeff=0``: the indexer learns only from its KL, so with none its weights are
    frozen (a pretrained indexer kept as it is: no weight decay, no optimizer state). Under
    Megatron's DDP with the overlapped grad reduce, which records in the first step which
    parameters have their gradient hook and waits for all of them afterwards, a T layer then
    trains step after step (with trainable indexer weights that never got a gradient, the second
    step's zero_grad_buffer stopped on Megatron's assertion). The main weights still learn and
    the selection still runs."""
    from megatron.core.distributed import DistributedDataParallel

    from megatron_ext.modules import indexer as hooks

    sparse = SparseAttentionConfig(pattern="T", window_size=3, num_sink_tokens=1, topk=3, indexer_num_heads=2,
                                   indexer_head_dim=8, indexer_kl_coeff=0.0, indexer_dense_warmup_iters=1,
                                   backend="torch")
    module = _attention(_config(sparse))
    frozen = {n: p.detach().clone() for n, p in module.indexer.named_parameters()}
    assert frozen and not any(p.requires_grad for p in module.indexer.parameters())
    ddp = DistributedDataParallel(module.config, compat.ddp_config(grad_reduce_in_fp32=True,
                                                                   overlap_grad_reduce=True), module)
    table = _rope_table(13, module.config.kv_channels)
    try:
        for step in (1, 2, 3):   # the warm-up step, then two top-k steps
            hooks.begin_step(step)
            ddp.zero_grad_buffer()
            out, _ = ddp(torch.randn(13, 2, 32, dtype=torch.float64), None, rotary_pos_emb=table)
            out.backward(torch.randn_like(out))
            ddp.finish_grad_sync()
            assert module.linear_qkv.weight.main_grad.abs().sum() > 0
        assert module.core_attention.topk_indices is not None
        for n, p in module.indexer.named_parameters():
            assert p.grad is None and torch.equal(p, frozen[n]), n
    finally:
        hooks.begin_step(0)
        hooks.indexer_loss_values()


def test_pattern_is_applied_per_layer_cyclically(parallel_state):
    from megatron.core.models.gpt import GPTModel

    from layer_specs.gpt import gpt_block_spec
    from layer_specs.sparse_mqa import layer_letters
    from megatron_ext.modules.sparse_mqa import SparseMQAttention

    assert [SparseAttentionConfig(pattern="WWWD").letter(n) for n in range(1, 9)] == list("WWWDWWWD")
    cfg = _config(SparseAttentionConfig(pattern="WD", window_size=4, num_sink_tokens=1, backend="torch"))
    assert layer_letters(cfg) == "WDWD"
    model = GPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=64,
                     max_sequence_length=16, position_embedding_type="rope").double()
    attns = [layer.self_attention for layer in model.decoder.layers]
    assert all(isinstance(a, SparseMQAttention) for a in attns)
    assert [a.letter for a in attns] == list("WDWD")
    assert [a.core_attention.window_size for a in attns] == [4, None, 4, None]
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens, torch.arange(16).expand(2, -1), None)
    logits.double().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_checkpoint_round_trip_with_per_layer_indexers(parallel_state, tmp_path):
    """Only T layers own an indexer, so its tensors cannot join the block's stacked layer axis:
    they are saved per global layer number; sink logits stay stacked."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel

    from layer_specs.gpt import gpt_block_spec

    cfg = _config(SparseAttentionConfig(pattern="WT", window_size=4, num_sink_tokens=1, learnable_sink=True,
                                        topk=2, backend="torch"))
    cfg.params_dtype = torch.float32
    model = GPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=64,
                     max_sequence_length=16, position_embedding_type="rope")
    keys = {t.key for t in model.sharded_state_dict().values()}
    assert "decoder.layers.self_attention.core_attention.sink_logits" in keys
    assert {"decoder.layers.self_attention.indexer.layer_2.linear_q.weight",
            "decoder.layers.self_attention.indexer.layer_4.linear_q.weight"} <= keys
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp_path)))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0, msg=name)


def _decode_vs_forward(module, s, prefill):
    b = 2
    hidden = torch.randn(s, b, module.config.hidden_size, dtype=torch.float64)
    table = _rope_table(s, module.config.kv_channels)
    with torch.no_grad():
        full, _ = module(hidden, None, rotary_pos_emb=table)
        cache = module.new_cache(b)
        outs = [module.prefill(hidden[:prefill], cache, rotary_pos_emb=table)[0]]
        sizes = set()
        for t in range(prefill, s):
            outs.append(module.decode_step(hidden[t:t + 1], cache, t, rotary_pos_emb=table)[0])
            sizes.add(cache.nbytes())
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-10, atol=1e-12)
    return cache, sizes


@pytest.mark.parametrize("window,sinks,learnable,groups", [(4, 2, False, 1), (3, 1, True, 1), (5, 0, True, 2)])
def test_decode_equals_full_forward_at_every_position(parallel_state, window, sinks, learnable, groups):
    sparse = SparseAttentionConfig(pattern="W", window_size=window, num_sink_tokens=sinks,
                                   learnable_sink=learnable, backend="torch")
    module = _attention(_config(sparse, groups=groups)).eval()
    if learnable:
        with torch.no_grad():
            module.core_attention.sink_logits.copy_(torch.randn(4))
    s = 17  # window < prompt < s: the ring wraps during prefill and during decode
    cache, sizes = _decode_vs_forward(module, s, prefill=6)
    d = module.config.kv_channels
    assert cache.length == s
    assert sizes == {2 * 2 * (sinks + window) * groups * d * 8}  # k and v, b=2, fp64: constant in s


@pytest.mark.parametrize("window,sinks,learnable,groups", [(3, 1, True, 1), (4, 0, False, 2), (None, 2, True, 1)])
def test_topk_layer_decode_equals_full_forward_at_every_position(parallel_state, window, sinks, learnable, groups):
    """T layers decode from an IndexedKVCache (every key/value + every indexer key): at each step the
    indexer scores the new query against all cached index keys, picks its top-k outside window and
    sinks, and the attention reads sinks + window + those keys; equal to the full forward (fp64).
    16 index heads make exact score ties (which top-k may break either way) practically impossible."""
    from megatron_ext.ops.sparse_attention.decode import IndexedKVCache

    sparse = SparseAttentionConfig(pattern="T", window_size=window, num_sink_tokens=sinks, learnable_sink=learnable,
                                   topk=3, indexer_num_heads=16, indexer_head_dim=8, backend="torch")
    module = _attention(_config(sparse, groups=groups)).eval()
    if learnable:
        with torch.no_grad():
            module.core_attention.sink_logits.copy_(torch.randn(4))
    s = 19
    cache, sizes = _decode_vs_forward(module, s, prefill=5)
    assert isinstance(cache, IndexedKVCache) and cache.length == s
    topk = module.core_attention.topk_indices  # of the prefill: the last forward
    assert (topk >= 0).any()
    d = module.config.kv_channels
    per_token = 2 * (2 * groups * d + 8) * 8  # b=2; k and v, plus one index key; fp64
    assert sorted(sizes) == [per_token * t for t in range(6, s + 1)]  # grows: O(S) by nature


def test_topk_decode_attends_exactly_sinks_window_and_selection():
    """decode_step_topk against a dense masked softmax: duplicates, -1 and future entries ignored,
    entries inside the window count once."""
    from megatron_ext.ops.sparse_attention.decode import IndexedKVCache, decode_step_topk

    b, hkv, hq, d, t = 2, 2, 4, 8, 12
    cache = IndexedKVCache(b, hkv, d, 4, window_size=3, num_sink_tokens=2, dtype=torch.float64, capacity=2)
    k, v = torch.randn(b, t, hkv, d, dtype=torch.float64), torch.randn(b, t, hkv, d, dtype=torch.float64)
    cache.append(k[:, :5], v[:, :5], 0, index_k=torch.randn(b, 5, 4, dtype=torch.float64))
    for p in range(5, t):
        cache.append(k[:, p:p + 1], v[:, p:p + 1], p, index_k=torch.randn(b, 1, 4, dtype=torch.float64))
    q = torch.randn(b, hq, d, dtype=torch.float64)
    sel = torch.tensor([[[4, 6, 6, -1, 10], [5, 15, 0, 3, 7]], [[2, 3, 4, 5, 6], [-1, -1, -1, -1, 8]]])
    sink = torch.randn(hq, dtype=torch.float64)
    out = decode_step_topk(q, cache, sel, softmax_scale=0.3, sink_logits=sink)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            keep = {0, 1, 9, 10, 11} | {j for j in sel[bi, g].tolist() if 0 <= j <= t - 1}
            idx = torch.tensor(sorted(keep))
            logits = torch.cat([k[bi, idx, g] @ q[bi, h] * 0.3, sink[h:h + 1]])
            p = torch.softmax(logits, 0)[:-1]
            torch.testing.assert_close(out[bi, h], p @ v[bi, idx, g], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"index_k.shape=None: a top-k layer caches the indexer key"):
        cache.append(k[:, :1], v[:, :1], t)


def test_streaming_decode_sdpa_path_matches_fp64_math():
    """Without a learnable sink, decode_step below fp64 is one SDPA call over sinks + ring with a
    validity mask (the ring's copies of the sinks masked out); it equals the fp64 softmax path."""
    from megatron_ext.ops.sparse_attention.decode import StreamingKVCache, decode_step

    b, hkv, hq, d, t = 2, 2, 4, 16, 11
    k, v = torch.randn(b, t, hkv, d, dtype=torch.float64), torch.randn(b, t, hkv, d, dtype=torch.float64)
    caches = {dt: StreamingKVCache(b, hkv, d, 4, 2, dtype=dt) for dt in (torch.float32, torch.float64)}
    for p in range(t):
        for cache in caches.values():
            cache.append(k[:, p:p + 1], v[:, p:p + 1], p)
        if p in (1, 5, t - 1):  # sinks still filling, ring wrapped, further on
            q = torch.randn(b, hq, d, dtype=torch.float64)
            fast = decode_step(q.float(), caches[torch.float32], softmax_scale=0.2)
            exact = decode_step(q, caches[torch.float64], softmax_scale=0.2)
            torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-6)


def test_dense_layer_decodes_with_a_growing_cache(parallel_state):
    sparse = SparseAttentionConfig(pattern="D", window_size=3, num_sink_tokens=1, backend="torch")
    module = _attention(_config(sparse)).eval()
    cache, sizes = _decode_vs_forward(module, 9, prefill=2)
    assert len(sizes) == 7  # grows one key per token: a dense layer keeps everything


def test_decode_rejects_out_of_order_positions_and_chunks(parallel_state):
    sparse = SparseAttentionConfig(pattern="W", window_size=4, backend="torch")
    module = _attention(_config(sparse)).eval()
    cache = module.new_cache(1)
    hidden = torch.randn(1, 1, module.config.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"position=3: the cache holds positions \[0, 0\)"):
        module.decode_step(hidden, cache, 3)
    with pytest.raises(ValueError, match="decode_step takes one token"):
        module.decode_step(hidden.expand(2, -1, -1), cache, 0)


def test_module_needs_the_sparse_config(parallel_state):
    from megatron.core.transformer.spec_utils import build_module

    from layer_specs.sparse_mqa import sparse_mqa_attention_spec

    cfg = _config(SparseAttentionConfig(pattern="W", window_size=4))
    spec = sparse_mqa_attention_spec(cfg, 1)
    cfg.sparse_attention = None
    with pytest.raises(ValueError, match="config.sparse_attention=None"):
        build_module(spec, config=cfg, layer_number=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sparse_mqa_trains_in_bf16_on_the_triton_kernels(tmp_path):
    """bf16 on the CUDA lane with the Triton window/sink kernels (a subprocess: the CPU-lane patches
    of this pytest process must not meet a CUDA run)."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    run = tmp_path / "gpu_sparse"
    cmd = [sys.executable, "-m", "megatron_ext", "train", "--preset", "test", "--device", "cuda",
           "--nproc-per-node", "1", "--runs-root", str(tmp_path), "--run-dir", str(run),
           "--train-iters", "30", "--lr-warmup-iters", "3", "--progress", "log",
           "--num-layers", "3", "--attention-pattern", "WWD", "--window-size", "16", "--num-sink-tokens", "2",
           "--num-query-groups", "1", "--learnable-sink", "--sparse-attention-backend", "triton"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(run)
    assert len(losses) == 30 and losses[-1] < losses[0] - 2.0
    r = receipt(run)
    assert r["runtime"]["dtype"] == "bf16"
    assert any(b["op"] == "sparse_attention" and b["observed"] == "triton" for b in r["backends"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_steps_in_bf16_match_fp64():
    """bf16 on CUDA: the streaming decode's SDPA path and the top-k decode against fp64 on the CPU."""
    from megatron_ext.ops.sparse_attention.decode import (
        IndexedKVCache, StreamingKVCache, decode_step, decode_step_topk)

    b, hkv, hq, d, t = 3, 1, 16, 128, 300
    k, v = torch.randn(b, t, hkv, d, dtype=torch.float64), torch.randn(b, t, hkv, d, dtype=torch.float64)
    q = torch.randn(b, hq, d, dtype=torch.float64)
    ik = torch.randn(b, t, 8, dtype=torch.float64)
    sel = torch.randint(-1, t, (b, 1, 16))
    for dtype, dev in ((torch.bfloat16, "cuda"), (torch.float64, "cpu")):
        s_cache = StreamingKVCache(b, hkv, d, 64, 4, dtype=dtype, device=dev)
        s_cache.append(k.to(dev), v.to(dev), 0)
        t_cache = IndexedKVCache(b, hkv, d, 8, window_size=64, num_sink_tokens=4, dtype=dtype, device=dev)
        t_cache.append(k.to(dev), v.to(dev), 0, index_k=ik.to(dev))
        qq = q.to(dev, dtype)
        got = (decode_step(qq, s_cache), decode_step_topk(qq, t_cache, sel.to(dev)))
        if dtype == torch.bfloat16:
            bf16 = [g.double().cpu() for g in got]
        else:
            for g, w in zip(bf16, got):
                torch.testing.assert_close(g, w, rtol=3e-2, atol=3e-2)
