"""The fused MoE layer's router against Megatron's MoELayer on 2 gloo ranks (one torchrun spawn,
this file as the worker), with the same weights:

* data parallel 2, ``global_aux_loss`` over two micro-batches: f_e from both ranks' counts (a
  running mean over the micro-batches); the aux loss's router gradient on each rank is Megatron's
  times the DP size. Megatron divides the local P_e by the *global* token count as well, so its
  loss shrinks with DP (its issue 3672); ours keeps the paper's local P_e (arXiv 2501.11873);
* TP=2 + sequence parallel with a padding mask (each rank's [b, s/tp] part): the mask is
  gathered with the logits; output shards, input gradients and the router gradient summed over
  TP as Megatron's, for the aux and the sequence aux loss with unevenly spread padding, and with
  the z-loss where the two shards hold as many real tokens (Megatron's z-loss at TP > 1 averages
  the ranks' own means; ours is the mean over all real tokens, as at TP = 1);
* TP=2 + SP with quantile balancing (megatron-core >= 0.19): the quantile over the whole
  gathered sequence, as Megatron's; output shards and the step's estimate equal Megatron's.
"""

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.multirank


def test_router_at_two_ranks_matches_megatron():
    from tests.helpers import subprocess_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    for case in ("DP2-GLOBAL-AUX-OK", "TP2-PADDING-MASK-OK"):
        assert proc.stdout.count(case) == 2, (case, proc.stdout[-3000:])
    # quantile balancing: compared where Megatron has it, said so where it has not
    assert proc.stdout.count("TP2-QUANTILE-OK") + proc.stdout.count("TP2-QUANTILE-SKIPPED") == 2


def _world(tp: int, **moe):
    """Parallel state at TP=tp (DP = 2 / tp) and Megatron's MoELayer + the fused layer with the same
    weights (tests.test_moe_layer's builder and shapes; sequence parallel when tp > 1)."""
    from megatron_ext import compat
    from tests import test_moe_layer as t

    compat.destroy_model_parallel()
    compat.initialize_model_parallel(tp, 1, 1)
    compat.seed_model_parallel(1234)
    par = dict(tensor_model_parallel_size=tp, sequence_parallel=True) if tp > 1 else {}
    return t._layers(t._tconfig(**par, **moe))


def _router_grad_over_tp(layer, tp_group) -> torch.Tensor:
    """The router weight's gradient summed over TP (Megatron's finalize sums a sequence-parallel
    parameter's per-rank parts)."""
    from tests.test_moe_layer import _router_weight

    g = _router_weight(layer).grad.clone()
    torch.distributed.all_reduce(g, group=tp_group)
    return g


def _worker():
    import torch.distributed as dist

    import patches
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron_ext import compat

    dist.init_process_group("gloo")
    patches.apply_patches("cpu")
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    from tests.test_moe_layer import B, H, S, aux_router_grads

    rank = dist.get_rank()

    # -- DP=2, global_aux_loss, two micro-batches
    stock, fused = _world(1, moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1)
    gen = torch.Generator().manual_seed(100 + rank)   # each rank its own tokens
    for mb in range(2):
        theirs, ours = aux_router_grads(stock, fused, torch.randn(S, B, H, generator=gen) * (1 + mb))
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, 2 * theirs, rtol=1e-5, atol=1e-9, msg=f"micro-batch {mb}")
    assert fused.router_global_steps.item() == 2
    print("DP2-GLOBAL-AUX-OK", flush=True)

    # -- TP=2 + SP, padding mask
    tp_group = ps.get_tensor_model_parallel_group()
    z = dict(moe_z_loss_coeff=0.01)
    seq = dict(moe_router_score_function="sigmoid", moe_router_load_balancing_type="seq_aux_loss",
               moe_aux_loss_coeff=0.05)
    # (router, padding on rank 0's half, on rank 1's): the z-loss only where both halves hold as
    # many real tokens. Megatron's z-loss at TP x CP > 1 is the mean of each rank's own mean (its
    # coefficient divided by TP x CP), so it weights a token by how much padding shares its rank's
    # shard; the fused layer's is the mean over all real tokens, as at TP = 1.
    for moe, pads in ((dict(moe_aux_loss_coeff=0.05), (2, 3)), (seq, (2, 3)),
                      (dict(moe_aux_loss_coeff=0.05, **z), (2, 2)), ({**seq, **z}, (1, 1))):
        stock, fused = _world(2, **moe)
        gen = torch.Generator().manual_seed(7)   # the same sequence on both ranks, sharded by SP
        x = torch.randn(S, B, H, generator=gen)
        g = torch.randn(S, B, H, generator=gen)
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 1:1 + pads[0]] = True          # in rank 0's half of the sequence
        pad[0, S - pads[1]:] = True           # in rank 1's half
        part = slice(rank * S // 2, (rank + 1) * S // 2)
        out = []
        for layer in (stock, fused):
            layer.zero_grad()
            xi = x[part].clone().requires_grad_()
            y, _ = layer(xi, padding_mask=pad[:, part].contiguous())
            y.backward(g[part])
            out.append((y.detach(), xi.grad, _router_grad_over_tp(layer, tp_group)))
        (ys, dxs, dws), (yf, dxf, dwf) = out
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dxf, dxs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dwf, dws, rtol=1e-5, atol=1e-6)
    print("TP2-PADDING-MASK-OK", flush=True)

    # -- TP=2 + SP, quantile balancing
    if not compat.mcore_has_quantile_balancing():
        print("TP2-QUANTILE-SKIPPED", flush=True)
    else:
        stock, fused = _world(2, moe_router_load_balancing_type="quantile_balancing",
                              moe_router_score_function="sigmoid")
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(S, B, H, generator=gen)
        part = slice(rank * S // 2, (rank + 1) * S // 2)
        ys, _ = stock(x[part].clone())
        yf, _ = fused(x[part].clone())
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.qb_beta_accum, stock.router.qb_beta_accum, rtol=1e-6, atol=1e-7)
        print("TP2-QUANTILE-OK", flush=True)
    compat.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
