"""Megatron DDP's gradient buffers: what this project's fused kernels need to know about them."""

from __future__ import annotations

from patches import patch


def _graphed(config) -> bool:
    """A CUDA-graph implementation is configured: a captured backward is replayed for every
    micro-batch, so it can neither store a step's first gradient nor zero a deferred buffer."""
    impl = getattr(config, "cuda_graph_impl", None)
    return (impl not in (None, "none") or bool(getattr(config, "enable_cuda_graph", False))
            or bool(getattr(config, "external_cuda_graph", False)))


def _deferrable_spans(ddp, opted):
    """``({buffer: sorted [(start, end)]}, {id(weight)})``: where the opted-in weights'
    ``main_grad`` views sit in each gradient buffer of ``ddp``, and which weights those are. A
    weight whose ``main_grad`` is not the view of ``grad_data`` that ``param_index_map`` records
    (a separate higher-precision copy, another layout) is left to the buffer's own zeroing."""
    out, ids = {}, set()
    for buf in list(ddp.buffers) + list(ddp.expert_parallel_buffers):
        index, grad = getattr(buf, "param_index_map", None), getattr(buf, "grad_data", None)
        if index is None or grad is None:
            continue
        spans = []
        for p in opted:
            loc = index.get(p)
            mg = getattr(p, "main_grad", None)
            if loc is None or mg is None:
                continue
            start, end = int(loc[0]), int(loc[1])
            if end - start == mg.numel() and mg.is_contiguous() and mg.dtype == grad.dtype \
                    and mg.data_ptr() == grad.data_ptr() + start * grad.element_size():
                spans.append((start, end))
                ids.add(id(p))
        if spans:
            out[buf] = sorted(spans)
    return out, ids


def _zero_around(buf, spans) -> None:
    """What ``_ParamAndGradBuffer.reset`` does (zero ``grad_data`` and, from megatron-core 0.19,
    the separate ``extra_main_grads``), except inside ``spans``."""
    grad, pos = buf.grad_data, 0
    for start, end in spans:
        if start > pos:
            grad[pos:start].zero_()
        pos = max(pos, end)
    if pos < grad.numel():
        grad[pos:].zero_()
    for extra in getattr(buf, "extra_main_grads", ()):
        extra.zero_()


@patch("ddp_expert_grad_zeroing", lane="any",
       reason="DistributedDataParallel.zero_grad_buffer zeroes every gradient buffer and clears "
              "grad_added_to_main_grad at a step's start. For the fused MoE experts' weights "
              "(opted in by ops.moe.autograd.track_zeroed_main_grad) the patched method marks them "
              "zeroed, so the weight-gradient kernel stores the step's first micro-batch instead "
              "of adding it to zeros (one read of the buffer less), and leaves their slices of the "
              "buffer unzeroed (one write less: 2.2 GB of fp32 per layer at the benchmark shape), "
              "since that store overwrites every element. Whatever else would touch a slice first "
              "zeroes it: the kernel's add, the weight's post-accumulate hook (before the DDP "
              "hook's add) and, patched here too, the bucket group's start_grad_sync (a weight "
              "that got no gradient). No mark under Transformer Engine CUDA graphs, where Megatron "
              "keeps grad_added_to_main_grad set; no deferral under any CUDA graphs")
def _expert_grad_zeroing():
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    from megatron_ext.ops.moe.autograd import STALE, ZEROED, settle_main_grad

    original_zero = DistributedDataParallel.zero_grad_buffer
    original_start = _ParamAndGradBucketGroup.start_grad_sync

    def zero_grad_buffer(self):
        opted = [p for p in self.params_with_grad if hasattr(p, ZEROED)]
        spans, deferred = ({}, set()) if not opted or _graphed(self.config) else \
            _deferrable_spans(self, opted)
        for buf, s in spans.items():   # the original calls buf.reset() on every buffer
            buf.reset = lambda buf=buf, s=s: _zero_around(buf, s)
        try:
            original_zero(self)
        finally:
            for buf in spans:
                vars(buf).pop("reset", None)
        if getattr(self.config, "cuda_graph_impl", "none") == "transformer_engine":
            return
        for p in opted:
            setattr(p, ZEROED, True)
            setattr(p, STALE, id(p) in deferred)

    def start_grad_sync(self, *args, **kwargs):
        for p in self.params:   # a deferred slice no gradient has written this step
            settle_main_grad(p)
        return original_start(self, *args, **kwargs)

    zero_grad_buffer.__doc__ = original_zero.__doc__
    start_grad_sync.__doc__ = original_start.__doc__
    DistributedDataParallel.zero_grad_buffer = zero_grad_buffer
    _ParamAndGradBucketGroup.start_grad_sync = start_grad_sync
