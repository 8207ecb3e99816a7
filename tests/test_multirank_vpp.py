"""Megatron's interleaved pipeline schedule (virtual pipeline stages, ``--num-layers-per-virtual-
pipeline-stage``) with mHC streams on 2 gloo ranks (one torchrun spawn, this file as the worker).

A 4-layer GPT of this project's mHC block (n = 2 streams, fused MoE layers inside) is built whole
at PP = 1, then as PP = 2 x 2 virtual stages (one layer a chunk; rank 0 holds layers 1 and 3,
rank 1 layers 2 and 4) with the whole model's weights. Four micro-batches through Megatron's
interleaved 1F1B give the losses of the whole model run through Megatron's no-pipelining
schedule, and every chunk's parameter gradients equal the whole model's (fp64). The stages
exchange ``[s, b, n * hidden]`` streams: the interleaved schedule sizes its p2p buffers from
``config.hidden_size`` as the plain 1F1B does, which the patch ``pp_p2p_stream_width`` widens;
on gloo the CPU-lane patch ``cpu_p2p_send_copy`` keeps the overlapped sends' data alive.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.multirank

LAYERS, MICRO, MBS = 4, 4, 2


def test_mhc_under_the_interleaved_pipeline_schedule_matches_one_stage():
    from tests.helpers import subprocess_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.stdout.count("MHC-VPP-OK") == 2, proc.stdout[-3000:]


def _tconfig(pp: int, vpp=None):
    import torch

    from megatron_ext.config import from_preset
    from megatron_ext.training.model import transformer_config

    cfg = from_preset("test", num_layers=LAYERS, hidden_size=32, num_attention_heads=4, seq_length=16,
                      mhc_num_streams=2, mhc_backend="torch", num_experts=4, moe_router_topk=2,
                      moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.01, moe_backend="torch",
                      pipeline_model_parallel_size=pp, untie_embeddings_and_output_weights=True)
    tconfig = transformer_config(cfg, "cpu", False)
    tconfig.params_dtype = tconfig.pipeline_dtype = torch.float64
    tconfig.virtual_pipeline_model_parallel_size = vpp
    if vpp:
        # Megatron's pretrain defaults with virtual stages: overlapped, unbatched p2p (even/odd
        # ordered). Its argument check refuses batched p2p with virtual stages at PP <= 2 (a batch
        # would hold two sends between the same two ranks); on gloo the activation and the
        # gradient, of one shape, then arrive swapped
        tconfig.overlap_p2p_comm, tconfig.batch_p2p_comm = True, False
    return tconfig


def _gpt(tconfig, vp_stage=None):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from layer_specs.mhc import mhc_block_spec

    kw = {} if vp_stage is None else {"vp_stage": vp_stage}
    first = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, **kw)
    last = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, **kw)
    return GPTModel(config=tconfig, transformer_layer_spec=mhc_block_spec(tconfig, vp_stage=vp_stage),
                    vocab_size=64, max_sequence_length=16, pre_process=first, post_process=last,
                    share_embeddings_and_output_weights=False, **kw).double()


def _run(chunks, batches):
    """Megatron's schedule for this parallel state over ``batches``: the micro-batches' losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(it, model):
        b = next(it)
        out = model(b["tokens"], b["pos"], None, labels=b["labels"])
        return out, lambda t: (t.mean(), {"loss": t.mean().detach()})

    its = [iter(batches) for _ in chunks]
    out = get_forward_backward_func()(forward_step_func=step, data_iterator=its if len(chunks) > 1 else its[0],
                                      model=chunks, num_microbatches=len(batches), seq_length=16,
                                      micro_batch_size=MBS, forward_only=False)
    return [float(d["loss"]) for d in out]


def _worker():
    import torch
    import torch.distributed as dist

    import patches
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron_ext import compat

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    patches.apply_patches("cpu")
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(MICRO):
        tokens = torch.randint(0, 64, (MBS, 16), generator=gen)
        batches.append({"tokens": tokens, "pos": torch.arange(16).expand(MBS, 16),
                        "labels": torch.roll(tokens, -1, 1)})

    # the whole model at one stage (both ranks build the same one: data parallel 2, same seed)
    compat.initialize_model_parallel(1, 1, 1)
    compat.seed_model_parallel(1234)
    torch.manual_seed(1234)
    whole = _gpt(_tconfig(1))
    for p in whole.parameters():   # fresh random values everywhere, the mixers' zero-init ones too
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    ref_losses = _run([whole], batches)
    ref = {n: (p.detach().clone(), p.grad.clone()) for n, p in whole.named_parameters()}
    compat.clear_moe_aux_loss_tracker(drop=True)

    # PP = 2 x 2 virtual stages, the same weights
    compat.destroy_model_parallel()
    compat.initialize_model_parallel(1, 2, 1, vpp=2)
    compat.seed_model_parallel(1234)
    tconfig = _tconfig(2, vpp=2)
    chunks = [_gpt(tconfig, vp_stage=v) for v in range(2)]
    names = []
    for v, chunk in enumerate(chunks):
        offset = get_transformer_layer_offset(tconfig, vp_stage=v)
        assert chunk.decoder.layers[0].layer_number == offset + 1
        for n, p in chunk.named_parameters():
            parts = n.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(int(parts[2]) + offset)
            names.append((".".join(parts), p))
            with torch.no_grad():
                p.copy_(ref[".".join(parts)][0])
    assert {n.split(".")[2] for n, _ in names if n.startswith("decoder.layers.")} == \
        ({"0", "2"} if rank == 0 else {"1", "3"})
    losses = _run(chunks, batches)
    if rank == 1:   # the last stage reports the losses
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for n, p in names:
        torch.testing.assert_close(p.grad, ref[n][1], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    assert {"pp_p2p_stream_width", "cpu_p2p_send_copy"} <= set(patches.applied())
    print("MHC-VPP-OK", rank, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
