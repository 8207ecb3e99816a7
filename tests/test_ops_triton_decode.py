"""Split-KV Triton decode attention: the kernel (CPU interpreter here, compiled on a GPU) against its
torch reference and an independent fp64 per-head loop, over the key layouts the decode paths use
(two key parts, values = keys, shared rope key, ring-buffer positions), masks and sink logits;
GQLA's decode through the kernel equals its training forward (interpreter, fp32; GPU, bf16)."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_ext.ops.sparse_attention.triton_decode import (  # noqa: E402
    decode_attention, decode_attention_reference)

needs_triton = triton_mark("megatron_ext.ops.sparse_attention.triton_decode")


def _loop_fp64(q, k, v, q_rope, k_rope, positions, qpos, window, sinks, sink_logits, scale):
    """Independent spec: one head and one key at a time, in fp64."""
    b, hq, _ = q.shape
    hkv, L = k.shape[1], k.shape[2]
    vals = k if v is None else v
    out = torch.zeros(b, hq, vals.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            logits, rows = [], []
            for j in range(L):
                p = j if positions is None else int(positions[j])
                if p < 0 or p > qpos or (window is not None and qpos - p >= window and p >= sinks):
                    continue
                s = q[bi, h].double() @ k[bi, g, j].double()
                if q_rope is not None:
                    s = s + q_rope[bi, h].double() @ k_rope[bi, min(g, k_rope.shape[1] - 1), j].double()
                logits.append(s * scale)
                rows.append(vals[bi, g, j].double())
            z = torch.stack(logits)
            if sink_logits is not None:
                z = torch.cat([z, sink_logits[h:h + 1].double()])
            w = torch.softmax(z, 0)[:len(rows)]
            out[bi, h] = (w[:, None] * torch.stack(rows)).sum(0)
    return out


CASES = [  # (hq, hkv, d1, d2, dv, L, window, sinks, values_are_keys, rope_shared, positions, splits)
    (4, 4, 24, 8, 8, 37, None, 0, False, False, False, None),   # ratio 1, d1 not a power of two
    (8, 2, 16, 8, 16, 45, 9, 2, False, True, False, 2),         # ratio 4, window + sinks, shared rope
    (16, 1, 32, 8, None, 53, None, 0, True, True, False, 3),    # ratio 16, absorb layout (v = k)
    (16, 1, 40, 0, None, 29, 6, 3, True, True, False, 1),       # absorb, no rope part, 40 -> 64 pad
    (4, 1, 16, 0, 16, 40, None, 0, False, True, True, 2),       # ring buffer: positions with holes
]


def _inputs(case, dtype, seed=0):
    hq, hkv, d1, d2, dv, L, window, sinks, v_is_k, shared, with_pos, _ = case
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    b = 2
    q, k = rnd(b, hq, d1), rnd(b, hkv, L, d1)
    v = None if v_is_k else rnd(b, hkv, L, dv)
    q_rope = rnd(b, hq, d2) if d2 else None
    k_rope = rnd(b, 1 if shared else hkv, L, d2) if d2 else None
    positions, qpos = None, L - 1
    if with_pos:  # a ring of L slots: scrambled positions, a few empty slots and one future slot
        positions = torch.randperm(L, generator=g) + 7
        positions[::5] = -1
        qpos = int(positions.max()) - 1
    return q, k, v, q_rope, k_rope, positions, qpos


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("learnable", [False, True])
def test_kernel_matches_reference_and_fp64(case, dtype, tol, learnable):
    q, k, v, q_rope, k_rope, positions, qpos = _inputs(case, dtype)
    hq, window, sinks, splits = q.shape[1], case[6], case[7], case[11]
    sink_logits = torch.randn(hq, generator=torch.Generator().manual_seed(1)) if learnable else None
    d = q.shape[-1] + (0 if q_rope is None else q_rope.shape[-1])
    kw = dict(q_rope=q_rope, k_rope=k_rope, key_positions=positions, query_position=qpos,
              window_size=window, num_sink_tokens=sinks, sink_logits=sink_logits, softmax_scale=0.7 / math.sqrt(d))
    mv = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = decode_attention(mv(q), mv(k), mv(v), num_splits=splits,
                           **{n: mv(t) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}).cpu()
    ref = decode_attention_reference(q, k, v, **kw)
    exact = _loop_fp64(q, k, v, q_rope, k_rope, positions, qpos, window, sinks, sink_logits, kw["softmax_scale"])
    assert got.dtype == dtype and got.shape == exact.shape
    torch.testing.assert_close(ref.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


@needs_triton
def test_split_count_does_not_change_the_result():
    q, k, v, q_rope, k_rope, _, _ = _inputs(CASES[1], torch.float32, seed=3)
    mv = lambda t: t.to(DEVICE)  # noqa: E731
    outs = [decode_attention(mv(q), mv(k), mv(v), q_rope=mv(q_rope), k_rope=mv(k_rope), num_splits=n).cpu()
            for n in (1, 4)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    """Errors name the field, the value and what is allowed (raised before any launch)."""
    q, k = torch.randn(2, 4, 16), torch.randn(2, 3, 10, 16)
    with pytest.raises(ValueError, match=r"k.shape=\(2, 3, 10, 16\): does not fit"):
        decode_attention(q, k, k)
    with pytest.raises(ValueError, match="q_rope/k_rope"):
        decode_attention(q, k[:, :2], k[:, :2], q_rope=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="v.dtype"):
        decode_attention(q, k[:, :2], k[:, :2].double())
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        decode_attention(q.double(), k[:, :2].double())


# ------------------------------------------------------------------------------------------------
# GQLA decode through the kernel == the training forward


@pytest.fixture
def parallel_state():
    from tests.helpers import cpu_model_parallel

    with cpu_model_parallel(11):
        yield


@needs_triton
@pytest.mark.parametrize("groups,window", [(1, None), (2, 3), (4, None)])
def test_gqla_decode_with_kernel_equals_training_forward(parallel_state, groups, window):
    from megatron_ext import backends
    from tests.test_gqla import HIDDEN, make_gqla

    m = make_gqla(groups, window=window, sinks=1 if window else 0, dtype=torch.float32, seed=groups)
    s, b, prompt = 7, 2, 4
    x = torch.randn(s, b, HIDDEN)
    with torch.no_grad():
        full = m(x)[0]
    m.gqla = dataclasses.replace(m.gqla, backend="triton")  # decode only; the forward above is torch
    m = m.to(DEVICE)
    for path in ("gqa", "absorb"):
        cache = m.init_cache(b, s, path=path)
        m.prefill(x[:prompt].to(DEVICE), cache)
        for t in range(prompt, s):
            step = m.decode_step(x[t:t + 1].to(DEVICE), cache, t)[0].cpu()
            torch.testing.assert_close(step[0], full[t], rtol=1e-5, atol=1e-5, msg=f"{path} position {t}")
    assert any(r["op"] == "gqla.decode" and r["observed"] == "triton" for r in backends.records())
