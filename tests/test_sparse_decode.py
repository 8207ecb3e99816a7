"""Streaming decode cache (ops layer, no Megatron): token-by-token decode over the sink + ring cache
equals the full-sequence reference op at every position, and the cache stays O(sinks + window)."""

import pytest
import torch

from megatron_ext.ops.sparse_attention import sparse_attention_reference
from megatron_ext.ops.sparse_attention.decode import StreamingKVCache, decode_step


def _full_and_streamed(s, hq, hkv, d, window, sinks, sink_logits, chunks, dtype=torch.float64):
    b = 2
    q = torch.randn(b, s, hq, d, dtype=dtype)
    k = torch.randn(b, s, hkv, d, dtype=dtype)
    v = torch.randn(b, s, hkv, d, dtype=dtype)
    full = sparse_attention_reference(q, k, v, window_size=window, num_sink_tokens=sinks, sink_logits=sink_logits)
    cache = StreamingKVCache(b, hkv, d, window, sinks, dtype=dtype)
    sizes, outs, pos = set(), [], 0
    for n in chunks:  # a chunk appends n keys at once (prefill-like); only its last query is checked
        cache.append(k[:, pos:pos + n], v[:, pos:pos + n], pos)
        pos += n
        outs.append((pos - 1, decode_step(q[:, pos - 1], cache, sink_logits=sink_logits)))
        sizes.add(cache.nbytes())
    return full, outs, sizes


@pytest.mark.parametrize("s,hq,hkv,d,window,sinks", [
    (23, 4, 1, 8, 5, 2),    # MQA, window < S, sinks
    (23, 4, 2, 8, 1, 0),    # window 1: only itself
    (23, 4, 4, 8, 40, 3),   # window > S: dense with sinks inside the window
    (23, 8, 1, 16, 3, 6),   # more sinks than the window
    (19, 4, 1, 8, 6, 0),    # no sinks
])
@pytest.mark.parametrize("learnable", [False, True])
def test_decode_equals_reference_at_every_position(s, hq, hkv, d, window, sinks, learnable):
    sink_logits = torch.randn(hq, dtype=torch.float64) if learnable else None
    full, outs, sizes = _full_and_streamed(s, hq, hkv, d, window, sinks, sink_logits, [1] * s)
    for t, out in outs:
        torch.testing.assert_close(out, full[:, t], rtol=1e-12, atol=1e-12, msg=f"position {t}")
    assert sizes == {2 * 2 * (sinks + window) * hkv * d * 8}  # k and v, b=2, fp64: constant in S


def test_chunked_appends_longer_than_the_window():
    full, outs, _ = _full_and_streamed(30, 4, 1, 8, 4, 2, torch.randn(4, dtype=torch.float64), [9, 1, 7, 1, 1, 11])
    assert [t for t, _ in outs] == [8, 9, 16, 17, 18, 29]
    for t, out in outs:
        torch.testing.assert_close(out, full[:, t], rtol=1e-12, atol=1e-12, msg=f"position {t}")


def test_dense_cache_grows_and_matches_causal_attention():
    full, outs, sizes = _full_and_streamed(12, 4, 2, 8, None, 0, None, [1] * 12)
    for t, out in outs:
        torch.testing.assert_close(out, full[:, t], rtol=1e-12, atol=1e-12)
    assert len(sizes) == 12


def test_fp32_decode_and_memory_at_long_context():
    window, sinks, d = 16, 4, 8
    full, outs, _ = _full_and_streamed(40, 4, 1, d, window, sinks, None, [1] * 40, dtype=torch.float32)
    for t, out in outs:
        torch.testing.assert_close(out, full[:, t], rtol=1e-5, atol=1e-6)
    cache = StreamingKVCache(1, 1, d, window, sinks, dtype=torch.float32)
    before = cache.nbytes()
    for t in range(500):
        cache.append(torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), t)
    assert cache.nbytes() == before == 2 * (window + sinks) * d * 4
    keys, _, valid = cache.keys_values()
    assert keys.shape[1] == window + sinks and int(valid.sum()) == window + sinks


def test_cache_errors():
    with pytest.raises(ValueError, match="window_size=0: the window counts the query itself"):
        StreamingKVCache(1, 1, 8, 0)
    with pytest.raises(ValueError, match="num_sink_tokens=-2"):
        StreamingKVCache(1, 1, 8, 4, -2)
    cache = StreamingKVCache(1, 2, 8, 4, 1)
    with pytest.raises(ValueError, match=r"cache.length=0: the cache is empty"):
        decode_step(torch.randn(1, 4, 8), cache)
    with pytest.raises(ValueError, match=r"k.shape/v.shape"):
        cache.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), 0)
    cache.append(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), 0)
    with pytest.raises(ValueError, match=r"position=5: the cache holds positions \[0, 1\); use position=1"):
        cache.append(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), 5)
    with pytest.raises(ValueError, match=r"q.shape=\(1, 3, 8\)"):
        decode_step(torch.randn(1, 3, 8), cache)
