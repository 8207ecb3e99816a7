"""Megatron DDP's gradient buffers: what this project's fused kernels need to know about them."""

from __future__ import annotations

from patches import patch


@patch("ddp_zeroed_grad_buffer_mark", lane="any",
       reason="DistributedDataParallel.zero_grad_buffer zeroes every gradient buffer and clears "
              "grad_added_to_main_grad at a step's start. The fused MoE experts' weight-gradient "
              "kernel then stores the step's first micro-batch into main_grad instead of adding it "
              "to the zeros there (the same values, one read of the buffer less: 2.2 GB of fp32 "
              "per layer at the benchmark shape). The patched method marks the weights that opted "
              "in (ops.moe.autograd.track_zeroed_main_grad) after the original has run; not under "
              "Transformer Engine CUDA graphs, where Megatron keeps grad_added_to_main_grad set")
def _mark_zeroed_buffers():
    from megatron.core.distributed import DistributedDataParallel

    from megatron_ext.ops.moe.autograd import ZEROED

    original = DistributedDataParallel.zero_grad_buffer

    def zero_grad_buffer(self):
        original(self)
        if getattr(self.config, "cuda_graph_impl", "none") == "transformer_engine":
            return
        for param in self.params_with_grad:
            if hasattr(param, ZEROED):
                setattr(param, ZEROED, True)

    zero_grad_buffer.__doc__ = original.__doc__
    DistributedDataParallel.zero_grad_buffer = zero_grad_buffer
