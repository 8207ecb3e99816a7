"""Lightning indexer: scores (torch and the Triton kernel) against a naive loop, top-k selection
semantics and its blockwise form, the KL loss against a hand-written formula (and that its gradient
reaches only the indexer), and the LightningIndexer module: detached input, KL attached to the
backward, dense warm-up, RoPE, logging."""

import json
import math
from tests.kernel_lane import DEVICE, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops.sparse_attention.indexer import (  # noqa: E402
    indexer_kl_loss, indexer_scores, indexer_scores_reference, indexer_topk, select_topk)

needs_triton = triton_mark("megatron_ext.ops.sparse_attention.triton_window")


def _idx_inputs(b, s, hi, di, dtype=torch.float32, seed=0, positive_w=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hi, di, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, di, generator=g, dtype=torch.float64)
    w = torch.rand(b, s, hi, generator=g, dtype=torch.float64) + 0.1 if positive_w else \
        torch.randn(b, s, hi, generator=g, dtype=torch.float64)
    return tuple(t.to(device, dtype) for t in (q, k, w))


def naive_scores(q, k, w):
    b, s, hi, _ = q.shape
    out = torch.full((b, s, s), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for t in range(s):
            for j in range(t + 1):
                out[bi, t, j] = sum(float(w[bi, t, h]) * max(0.0, float(q[bi, t, h].double() @ k[bi, j].double()))
                                    for h in range(hi))
    return out


def test_reference_scores_match_naive_loop():
    q, k, w = _idx_inputs(2, 9, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(indexer_scores_reference(q, k, w), naive_scores(q, k, w))


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_triton_scores_match_naive_loop(dtype, tol):
    q, k, w = _idx_inputs(2, 37, 3, 16, dtype=dtype, device=DEVICE)
    got = indexer_scores(q, k, w, backend="triton").cpu()
    want = naive_scores(q.cpu(), k.cpu(), w.cpu())
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=tol, atol=tol)
    assert backends.records()[0]["observed"] == "triton"


def test_select_topk_semantics():
    inf = float("-inf")
    scores = torch.tensor([[[1.0, inf, inf, inf],
                            [0.5, 2.0, inf, inf],
                            [3.0, 1.0, 2.0, inf],
                            [0.0, 4.0, 1.0, 2.0]]])
    got = select_topk(scores, 3)
    assert got.shape == (1, 4, 1, 3) and got.dtype == torch.int32
    assert got[0, :, 0].tolist() == [[0, -1, -1], [1, 0, -1], [0, 2, 1], [1, 3, 2]]
    assert select_topk(scores, 6)[0, 3, 0].tolist() == [1, 3, 2, 0, -1, -1]   # k > s: -1 padded
    # keys covered by the window (t - j < 2) and the sink (j < 1) are excluded from the budget
    assert select_topk(scores, 2, window_size=2, num_sink_tokens=1)[0, :, 0].tolist() == \
        [[-1, -1], [-1, -1], [-1, -1], [1, -1]]
    with pytest.raises(ValueError, match=r"topk=0: .*; use an int >= 1"):
        select_topk(scores, 0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_blockwise_topk_equals_full(backend):
    q, k, w = _idx_inputs(2, 45, 2, 16, positive_w=True, seed=4, device=DEVICE if backend == "triton" else "cpu")
    full = select_topk(indexer_scores_reference(q, k, w), 6, window_size=3, num_sink_tokens=1)
    for block_q in (7, 16, 45):
        got = indexer_topk(q, k, w, 6, window_size=3, num_sink_tokens=1, block_q=block_q, backend=backend)
        # compare the selected scores (ties may pick either key)
        ref_scores = indexer_scores_reference(q, k, w).cpu()

        def pick(i):
            i = i[:, :, 0].cpu().long()
            return torch.where(i >= 0, torch.gather(ref_scores, 2, i.clamp_min(0)), -1.0)

        # the Triton path returns each row's selection unordered: compare sorted selected scores
        srt = lambda x: torch.sort(x, dim=-1).values  # noqa: E731
        torch.testing.assert_close(srt(pick(got)), srt(pick(full)), rtol=1e-5, atol=1e-5)
        assert torch.equal((got >= 0).sum(-1).cpu(), (full >= 0).sum(-1).cpu())
        rows = got[:, :, 0].cpu().long()
        for r in rows.reshape(-1, rows.shape[-1]):  # the selection of a row is duplicate-free
            sel = r[r >= 0]
            assert sel.unique().numel() == sel.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window,sinks", [(None, 0), (128, 4)])
def test_gpu_bf16_blockwise_topk_selects_the_top_scores(window, sinks):
    """bf16 at a realistic length: the selected keys' reference scores are the k largest (up to
    rounding: near-ties may pick either key), each row duplicate-free, -1 only where keys run out."""
    s, k = 3000, 256
    q, kk, w = _idx_inputs(1, s, 4, 32, dtype=torch.bfloat16, positive_w=True, seed=7, device="cuda")
    got = indexer_topk(q, kk, w, k, window_size=window, num_sink_tokens=sinks, block_q=1024,
                       backend="triton")[:, :, 0].long()
    ref = indexer_scores_reference(q, kk, w)
    want = select_topk(ref, k, window_size=window, num_sink_tokens=sinks)[:, :, 0].long()
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))
    pick = lambda i: torch.sort(torch.where(i >= 0, torch.gather(ref, 2, i.clamp_min(0)), -1.0), -1).values  # noqa: E731
    torch.testing.assert_close(pick(got), pick(want), rtol=2e-2, atol=2e-2)
    srt = torch.sort(got, -1).values
    assert not torch.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0))


# ------------------------------------------------------------------------------------------------
# KL loss
# ------------------------------------------------------------------------------------------------

def naive_kl(q, k, qi, ki, w, topk, scale):
    """DSA eqs. 3/4 spelled out per query in fp64: head-summed per-head softmax (L1-normalised)
    against the softmax of the index scores, over the selected (or all causal) keys."""
    b, s, hq, _ = q.shape
    group = hq // k.shape[2]
    total, rows = 0.0, 0
    for bi in range(b):
        for t in range(s):
            keys = list(range(t + 1)) if topk is None else sorted(
                {j for j in topk[bi, t, 0].tolist() if 0 <= j <= t})
            if not keys:
                continue
            target = [0.0] * len(keys)
            for h in range(hq):
                logit = [scale * float(q[bi, t, h] @ k[bi, j, h // group]) for j in keys]
                m = max(logit)
                z = sum(math.exp(x - m) for x in logit)
                for n, x in enumerate(logit):
                    target[n] += math.exp(x - m) / z
            target = [x / sum(target) for x in target]
            idx = [sum(float(w[bi, t, h]) * max(0.0, float(qi[bi, t, h] @ ki[bi, j])) for h in range(qi.shape[2]))
                   for j in keys]
            m = max(idx)
            lz = m + math.log(sum(math.exp(x - m) for x in idx))
            total += sum(p * (math.log(p) - (x - lz)) for p, x in zip(target, idx) if p > 0)
            rows += 1
    return total / rows


@pytest.mark.parametrize("sparse", [False, True])
def test_kl_loss_matches_hand_formula_and_only_trains_the_indexer(sparse):
    b, s, hq, hkv, d = 2, 13, 4, 2, 8
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    qi, ki, w = (t.requires_grad_(True) for t in _idx_inputs(b, s, 2, 4, dtype=torch.float64, seed=8))
    topk = torch.randint(-1, s, (b, s, 1, 5), generator=g, dtype=torch.int32) if sparse else None
    if sparse:  # duplicate-free lists, as select_topk returns them
        topk = select_topk(indexer_scores_reference(qi.detach(), ki.detach(), w.detach()), 5)
        topk[:, ::3, 0, 0] = -1
    loss = indexer_kl_loss(q, k, qi, ki, w, topk, softmax_scale=0.4, block_q=4)
    want = naive_kl(q.detach(), k.detach(), qi.detach(), ki.detach(), w.detach(), topk, 0.4)
    assert abs(loss.item() - want) < 1e-9 and loss.item() > 0
    loss.backward()
    assert q.grad is None and k.grad is None  # the main attention's q/k are detached
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (qi, ki, w))
    # block size (and so the checkpointed recompute) does not change value or gradient
    grads = [t.grad.clone() for t in (qi, ki, w)]
    for t in (qi, ki, w):
        t.grad = None
    indexer_kl_loss(q, k, qi, ki, w, topk, softmax_scale=0.4, block_q=100).backward()
    for a, t in zip(grads, (qi, ki, w)):
        torch.testing.assert_close(a, t.grad)
    # gradcheck of the indexer side (small, fp64)
    small = lambda a, b_, c: indexer_kl_loss(q[:1, :6], k[:1, :6], a, b_, c,  # noqa: E731
                                             None if topk is None else topk[:1, :6], block_q=4)
    assert torch.autograd.gradcheck(small, (qi[:1, :6].detach().requires_grad_(True),
                                            ki[:1, :6].detach().requires_grad_(True),
                                            w[:1, :6].detach().requires_grad_(True)))


def test_kl_loss_is_zero_when_distributions_agree():
    """One main head, one index head with the same logits up to ReLU-free positive scores."""
    b, s, d = 1, 7, 4
    g = torch.Generator().manual_seed(1)
    k = torch.rand(b, s, 1, d, generator=g, dtype=torch.float64)
    q = torch.rand(b, s, 1, d, generator=g, dtype=torch.float64)
    loss = indexer_kl_loss(q, k, q.clone().view(b, s, 1, d), k.view(b, s, d), torch.ones(b, s, 1, dtype=torch.float64),
                           softmax_scale=1.0)
    assert abs(loss.item()) < 1e-12


# ------------------------------------------------------------------------------------------------
# LightningIndexer module
# ------------------------------------------------------------------------------------------------

def _module(window=3, sinks=1, topk=4, warmup=2, coeff=0.5, groups=2):
    from megatron_ext import compat
    from megatron_ext.config import SparseAttentionConfig
    from megatron_ext.modules.indexer import LightningIndexer

    cfg = compat.make_transformer_config(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=groups, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=torch.float64)
    sparse = SparseAttentionConfig(pattern="T", window_size=window, num_sink_tokens=sinks, topk=topk,
                                   indexer_num_heads=2, indexer_head_dim=16, indexer_kl_coeff=coeff,
                                   indexer_dense_warmup_iters=warmup, backend="torch")
    torch.manual_seed(0)
    return LightningIndexer(cfg, sparse, layer_number=1).double(), sparse


def test_indexer_module_forward_backward_and_warmup(tmp_path):
    from megatron_ext.modules import indexer as mod

    idx_mod, sparse = _module()
    s, b = 11, 2
    hidden = torch.randn(s, b, 32, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, s, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, 2, 8, dtype=torch.float64, requires_grad=True)

    for step, dense in ((1, True), (3, False)):
        mod.begin_step(step)
        assert idx_mod.dense_warmup is dense
        for t in (hidden, q, k, *idx_mod.parameters()):
            t.grad = None
        topk = idx_mod(hidden)
        assert topk.shape == (b, s, 2, 4) and topk.dtype == torch.int32
        assert torch.equal(topk[:, :, 0], topk[:, :, 1])
        tpos = torch.arange(s).view(1, s, 1)
        sel = topk[:, :, 0]
        ok = sel >= 0
        # causal, outside the window (t - j >= 3) and past the sink (j >= 1)
        assert torch.all(~ok | ((sel <= tpos) & (tpos - sel >= 3) & (sel >= 1)))
        assert torch.all(ok.sum(-1) == (tpos[..., 0] - 3).clamp(0, 4))  # every candidate used up to k

        out = (q * 2).sum()
        out2 = idx_mod.attach_kl_loss(out, q, k)
        assert out2.item() == out.item()
        out2.backward()
        torch.testing.assert_close(q.grad, torch.full_like(q, 2.0))  # the KL does not reach q/k
        assert k.grad is None and hidden.grad is None                 # ... nor the detached input
        q_idx, k_idx, w = idx_mod.index_inputs(hidden)
        want = torch.autograd.grad(
            sparse.indexer_kl_coeff * indexer_kl_loss(q, k, q_idx, k_idx, w, None if dense else topk[:, :, :1]),
            list(idx_mod.parameters()))
        for p, wg in zip(idx_mod.parameters(), want):
            torch.testing.assert_close(p.grad, wg)

    metrics = tmp_path / "m.jsonl"
    mod.end_step(3, metrics)
    row = json.loads(metrics.read_text().splitlines()[-1])
    assert row["kind"] == "indexer" and set(row["kl"]) == {"1"} and row["kl"]["1"] > 0
    assert mod.indexer_loss_values() == {}
    mod.begin_step(0)


def test_indexer_module_eval_and_rope():
    idx_mod, _ = _module(window=None, sinks=0, warmup=0)
    hidden = torch.randn(9, 1, 32, dtype=torch.float64)
    idx_mod.eval()
    with torch.no_grad():
        plain = idx_mod(hidden)
        inv = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
        ang = torch.arange(9, dtype=torch.float64)[:, None] * inv[None]
        table = torch.cat([ang, ang], -1).view(9, 1, 1, 8)
        q0, k0, _ = idx_mod.index_inputs(hidden)
        q1, k1, _ = idx_mod.index_inputs(hidden, table)
    torch.testing.assert_close(q0[..., 8:], q1[..., 8:])   # only the first 8 dims rotate
    torch.testing.assert_close(q0.norm(dim=-1), q1.norm(dim=-1))
    torch.testing.assert_close(k0[0, 0], k1[0, 0])         # position 0: no rotation
    assert not torch.allclose(k0[0, 5], k1[0, 5])
    assert plain.shape == (1, 9, 2, 4)
    out = torch.ones(3, requires_grad=True)
    assert idx_mod.attach_kl_loss(out, None, None) is out  # eval: nothing attached


def test_indexer_module_config_errors():
    with pytest.raises(ValueError, match=r"sparse_topk=None: .*; use an int >= 1"):
        _module(topk=None)
