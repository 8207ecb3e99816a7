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
  gathered sequence, as Megatron's; output shards and the step's estimate equal Megatron's;
* TP=2 + SP with moe_apply_probs_on_input (top-1, the gate on the expert's input): as Megatron's;
* TP=2 + SP with a packed micro-batch of two samples (megatron-core >= 0.19, ``tokens_per_sample``;
  ``[mbs*S/tp, 1, h]`` per rank): the per-sequence aux loss groups the gathered tokens by sample,
  the same output and router gradient as at TP=1 (where Megatron un-flattens to ``[S, mbs, h]``);
* TP=2 + SP with router jitter under Megatron's full-layer recompute (``tensor_parallel.checkpoint``,
  which rewinds the RNG tracker for the recompute): the recomputed forward draws the forward's
  noise, so its gradients are those of the plain forward from the same RNG state;
* latent MoE (moe_latent_size) with a shared expert and with the gate on the input, at TP=2 + SP
  with expert TP, at TP=2 + SP without it, and at EP=2: output shards and the gradients of the
  input, the router, the latent projections and the experts equal the same layer at one rank;
* Megatron's RouterReplay at TP=2 + SP, with expert TP and without: the recorded ids (each rank its
  own tokens) and a replayed target's output shards and gradients equal Megatron's.
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
    for case in ("DP2-GLOBAL-AUX-OK", "TP2-PADDING-MASK-OK", "TP2-JITTER-RECOMPUTE-OK", "LATENT-LAYOUTS-OK",
                 "TP2-ROUTER-REPLAY-OK"):
        assert proc.stdout.count(case) == 2, (case, proc.stdout[-3000:])
    # quantile balancing and packed batches: compared where Megatron has them, said so where it has not
    for case in ("TP2-QUANTILE", "TP2-PACKED"):
        assert proc.stdout.count(f"{case}-OK") + proc.stdout.count(f"{case}-SKIPPED") == 2, case


def _config_at(tp: int, ep: int = 1, etp=None, **moe):
    """Fresh parallel state at TP=tp, EP=ep, expert TP=etp (None: = tp), seeded alike on every rank,
    and the TransformerConfig of tests.test_moe_layer's shapes there (sequence parallel when tp > 1)."""
    from megatron_ext import compat
    from tests import test_moe_layer as t

    compat.destroy_model_parallel(destroy_groups=True)
    compat.initialize_model_parallel(tp, 1, ep, etp=etp)
    compat.seed_model_parallel(1234)
    torch.manual_seed(1234)   # the CPU generator the initialisation draws from: the same on every rank
    par = dict(tensor_model_parallel_size=tp, sequence_parallel=True) if tp > 1 else {}
    if tp > 1 and etp is not None:
        par["expert_tensor_parallel_size"] = etp
    return t._tconfig(**par, **moe)


def _world(tp: int, **moe):
    """Parallel state at TP=tp (DP = 2 / tp) and Megatron's MoELayer + the fused layer with the same
    weights (tests.test_moe_layer's builder and shapes; sequence parallel when tp > 1)."""
    from tests import test_moe_layer as t

    return t._layers(_config_at(tp, **moe))


def _fused_at(tp: int, ep: int, etp: int, **moe):
    """The fused layer alone at TP=tp, EP=ep, expert TP=etp (sequence parallel when tp > 1)."""
    from megatron_ext.modules.moe import FusedMoELayer

    layer = FusedMoELayer(_config_at(tp, ep, etp, **moe))
    layer.set_layer_number(1)
    return layer


def _copy_weights(layer, ref, r: int, n: int, first_expert: int) -> None:
    """``ref``'s weights (one rank's layer) into ``layer``: its experts from ``first_expert`` on,
    and expert TP rank r of n's F slice of those and of the shared expert."""
    from megatron_ext.modules.moe import _tp_cols

    with torch.no_grad():
        for name in ("router_weight", "latent_w1", "latent_w2"):
            if getattr(ref, name) is not None:
                getattr(layer, name).copy_(getattr(ref, name))
        experts = range(first_expert, first_expert + layer.w1.shape[0])
        Fl = layer.w2.shape[1]
        layer.w1.copy_(torch.stack([_tp_cols(ref.w1[e], ref.parts, r, n) for e in experts]))
        layer.w2.copy_(ref.w2[first_expert:first_expert + len(experts), r * Fl:(r + 1) * Fl])
        if ref.shared_w1 is not None:
            Fsl = layer.shared_w2.shape[0]
            layer.shared_w1.copy_(_tp_cols(ref.shared_w1, ref.parts, r, n))
            layer.shared_w2.copy_(ref.shared_w2[r * Fsl:(r + 1) * Fsl])


def _latent_layouts(rank: int) -> None:
    """Latent MoE at three layouts against one rank's layer on the same tokens (each rank's own
    tokens at EP=2, one sequence split by SP at TP=2)."""
    from megatron.core import parallel_state as ps
    from tests.test_moe_layer import B, E, H, S

    for moe in (dict(moe_latent_size=16, moe_shared_expert_intermediate_size=16, moe_aux_loss_coeff=0.01),
                dict(moe_latent_size=16, moe_router_topk=1, moe_apply_probs_on_input=True,
                     moe_router_score_function="sigmoid")):
        for tp, ep, etp in ((2, 1, 2), (2, 1, 1), (1, 2, 1)):
            gen = torch.Generator().manual_seed(21 + (rank if ep > 1 else 0))
            x = torch.randn(S, B, H, generator=gen)
            g = torch.randn(S, B, H, generator=gen)
            ref = _fused_at(1, 1, 1, **moe)
            xr = x.clone().requires_grad_()
            yr, _ = ref(xr)
            yr.backward(g)
            layer = _fused_at(tp, ep, etp, **moe)
            _copy_weights(layer, ref, rank if etp > 1 else 0, etp, rank * E // ep if ep > 1 else 0)
            part = slice(rank * S // tp, (rank + 1) * S // tp) if tp > 1 else slice(None)
            xi = x[part].clone().requires_grad_()
            y, _ = layer(xi)
            y.backward(g[part])
            where = f"{moe} tp={tp} ep={ep} etp={etp}"
            torch.testing.assert_close(y, yr[part], rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(xi.grad, xr.grad[part], rtol=1e-5, atol=1e-6, msg=where)
            names = ["router_weight", "latent_w1", "latent_w2"]
            if etp == 1:   # whole experts: each rank's expert gradients over its own tokens
                names += ["w1", "w2"]
            for name in names:
                grad = getattr(layer, name).grad.clone()
                if tp > 1:   # Megatron sums these over TP (sequence-parallel or expert-DP reduction)
                    torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
                want = getattr(ref, name).grad
                if name in ("w1", "w2") and ep > 1:
                    # an expert's rows come from both ranks' tokens: the two one-rank layers' sum
                    want = want.clone()
                    torch.distributed.all_reduce(want, group=ps.get_expert_model_parallel_group())
                    want = want[rank * E // ep:(rank + 1) * E // ep]
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=f"{where} {name}")


def _packed_under_sequence_parallel(rank: int) -> bool:
    """A packed micro-batch of two samples through Megatron's TransformerLayer MLP path (this
    project's MoE block spec) at TP=2 + SP against TP=1; False where Megatron does not un-flatten
    packed batches for MoE (before 0.19)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from layer_specs.moe import moe_block_spec
    from tests.test_moe_layer import H, S

    if not hasattr(TransformerLayer, "_maybe_unflatten_for_moe"):
        return False
    from megatron.core.packed_seq_params import PackedSeqParams

    moe = dict(moe_router_score_function="sigmoid", moe_router_load_balancing_type="seq_aux_loss",
               moe_aux_loss_coeff=0.1)
    mbs = 2
    h = torch.randn(mbs * S, 1, H, generator=torch.Generator().manual_seed(41))
    params = PackedSeqParams(qkv_format="thd", tokens_per_sample=S)
    out, ref = [], None
    for tp in (1, 2):
        cfg = _config_at(tp, **moe)
        layer = build_module(moe_block_spec(cfg).layer_specs[0], config=cfg, layer_number=1)
        if ref is None:
            ref = layer
        else:
            _copy_weights(layer.mlp, ref.mlp, rank, tp, 0)
        part = slice(rank * mbs * S // tp, (rank + 1) * mbs * S // tp) if tp > 1 else slice(None)
        y = layer._forward_mlp(h[part].clone(), packed_seq_params=params)
        y = y[0] if isinstance(y, (tuple, list)) else y
        y.backward(torch.zeros_like(y))   # the balancing loss's gradient alone
        g = layer.mlp.router_weight.grad.clone()
        if tp > 1:
            torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        out.append((y.detach(), g, part))
    (y1, g1, _), (y2, g2, part) = out
    assert g1.abs().max() > 0
    torch.testing.assert_close(y2, y1[part], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)
    return True


def _jitter_under_recompute(rank: int) -> None:
    """Two identical TP=2 + SP layers with strong router jitter from the same RNG state: one run
    plainly, one inside Megatron's full-layer recompute; same output, input and weight gradients."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from tests.test_moe_layer import B, H, S

    moe = dict(moe_input_jitter_eps=0.5, moe_router_score_function="sigmoid")
    plain, checkpointed = _fused_at(2, 1, 2, **moe), _fused_at(2, 1, 2, **moe)
    checkpointed.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(31)
    x, g = torch.randn(S, B, H, generator=gen), torch.randn(S, B, H, generator=gen)
    part = slice(rank * S // 2, (rank + 1) * S // 2)
    tracker = get_cuda_rng_tracker()
    states, cpu = tracker.get_states(), torch.get_rng_state()
    out = []
    for layer, recompute in ((plain, False), (checkpointed, True)):
        tracker.set_states(dict(states))   # a copy: forking writes the states back into the dict
        torch.set_rng_state(cpu)
        xi = x[part].clone().requires_grad_()
        fn = lambda t, layer=layer: layer(t)[0]
        y = tensor_parallel.checkpoint(fn, False, xi) if recompute else fn(xi)
        y.backward(g[part])
        out.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _router_replay_over_tp(rank: int, tp_group) -> None:
    """Megatron's RouterReplay at TP=2 + SP, with expert TP and without: each rank records its own
    tokens' ids as Megatron's router does, and a replayed target (each rank its own rows) gives
    Megatron's output shards, input gradients and TP-summed router gradient."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
    from tests import test_moe_layer as t

    part = slice(rank * t.S // 2, (rank + 1) * t.S // 2)
    for etp in (None, 1):
        RouterReplay.clear_global_router_replay_instances()
        cfg = _config_at(2, etp=etp, moe_aux_loss_coeff=0.05, moe_router_score_function="sigmoid")
        cfg.moe_enable_routing_replay = True
        stock, fused = t._layers(cfg)
        gen = torch.Generator().manual_seed(13)   # the same sequence on both ranks, sharded by SP
        x = torch.randn(t.S, t.B, t.H, generator=gen)
        g = torch.randn(t.S, t.B, t.H, generator=gen)
        target = t._replay_targets(t.S * t.B, 2, seed=14).view(t.S, t.B, 2)[part].reshape(-1, 2)
        for action in (RouterReplayAction.RECORD, RouterReplayAction.REPLAY_FORWARD):
            if action == RouterReplayAction.REPLAY_FORWARD:
                RouterReplay.set_replay_data([target.clone(), target.clone()])
            RouterReplay.set_global_router_replay_action(action)
            out = []
            for layer in (stock, fused):
                layer.zero_grad()
                xi = x[part].clone().requires_grad_()
                y, _ = layer(xi)
                y.backward(g[part])
                out.append((y.detach(), xi.grad, _router_grad_over_tp(layer, tp_group)))
            for a, b in zip(*out):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            if action == RouterReplayAction.RECORD:
                theirs, ours = RouterReplay.get_recorded_data()
                assert ours.shape == (t.S // 2 * t.B, 2) and torch.equal(ours, theirs), (etp, ours, theirs)
                assert not torch.equal(ours, target)
    RouterReplay.clear_global_router_replay_instances()


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
    # the gate on the expert's input (top-1), as Megatron applies it to its dispatched tokens
    probs_on_input = dict(moe_router_topk=1, moe_apply_probs_on_input=True, moe_router_pre_softmax=True,
                          moe_aux_loss_coeff=0.05)
    for moe, pads in ((dict(moe_aux_loss_coeff=0.05), (2, 3)), (seq, (2, 3)),
                      (dict(moe_aux_loss_coeff=0.05, **z), (2, 2)), ({**seq, **z}, (1, 1)),
                      (probs_on_input, (1, 2))):
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

    print("TP2-PACKED-OK" if _packed_under_sequence_parallel(rank) else "TP2-PACKED-SKIPPED", flush=True)
    _jitter_under_recompute(rank)
    print("TP2-JITTER-RECOMPUTE-OK", flush=True)
    _latent_layouts(rank)
    print("LATENT-LAYOUTS-OK", flush=True)
    _router_replay_over_tp(rank, tp_group)
    print("TP2-ROUTER-REPLAY-OK", flush=True)
    compat.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
