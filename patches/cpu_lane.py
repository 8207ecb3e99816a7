"""CPU lane: route megatron-core's CUDA-only calls to the CPU (torch CPU build, gloo).

Applied only when the run has no CUDA device. Each patch names the megatron-core code it works
around; see docs/cpu_lane.md for the measured behaviour with and without them.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

from patches import patch


@patch("cpu_rng_tracker", lane="cpu",
       reason="tensor_parallel/random.py CudaRNGStatesTracker.add() calls torch.cuda.get_rng_state(); "
              "a tracker with the same API keeps per-name CPU generator states instead")
def _rng_tracker():
    from megatron.core.tensor_parallel import random as mr

    class CPURNGStatesTracker(mr.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"rng seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mr._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mr._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mr._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


@patch("cpu_current_device", lane="cpu",
       reason="about 40 sites allocate on torch.cuda.current_device() (GlobalMemoryBuffer, TP/SP/EP "
              "communication buffers, router gating, RotaryEmbedding.get_emb, DDP grad buffers)")
def _current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")


@patch("cpu_embedding_copy", lane="cpu",
       reason="models/common/language_module/language_module.py setup_embeddings_and_output_layer moves "
              "the last stage's copy of the word embeddings with .cuda() before the all-reduce that "
              "makes it equal the first stage's (pipeline parallel with tied embeddings or --mtp-num-layers); "
              "the copy stays on the CPU")
def _embedding_copy():
    import functools

    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t   # only for the duration of this call
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


@patch("cpu_p2p_send_copy", lane="cpu",
       reason="pipeline_parallel/schedules.py deallocate_output_tensor swaps a sent activation's storage "
              "for a 1-element one right after the send is posted; with the interleaved schedule's "
              "overlapped p2p nothing waits for the send first, and gloo sends from a background thread, "
              "which then read freed memory (NCCL's stream-ordered allocator keeps it alive): the CPU "
              "lane sends a copy")
def _p2p_send_copy():
    import functools

    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    original = P2PCommunicator._communicate

    def copy(t):
        return None if t is None else t.detach().clone()

    @functools.wraps(original)
    def _communicate(self, *, tensor_send_next, tensor_send_prev, **kwargs):
        return original(self, tensor_send_next=copy(tensor_send_next), tensor_send_prev=copy(tensor_send_prev),
                        **kwargs)

    P2PCommunicator._communicate = _communicate


@patch("cpu_default_causal_mask", lane="cpu",
       reason="transformer/utils.py get_default_causal_mask builds the mask with device='cuda'")
def _causal_mask():
    import megatron.core.fusions.fused_softmax as fs
    import megatron.core.transformer.utils as tu

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tu.get_default_causal_mask = fs.get_default_causal_mask = get_default_causal_mask


@patch("cpu_streams", lane="cpu",
       reason="moe/token_dispatcher.py (alltoall) creates torch.cuda.Stream() and records events")
def _streams():
    class _Event:
        def synchronize(self):
            pass

        def wait(self, *args, **kwargs):
            pass

    class _Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

        def record_event(self, *args, **kwargs):
            return _Event()

        def synchronize(self):
            pass

        def __eq__(self, other):
            return isinstance(other, _Stream)

        __hash__ = object.__hash__

    default = _Stream()
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: default
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


@patch("cpu_a2a_split_sizes", lane="cpu",
       reason="moe_utils.maybe_move_tensor_to_cpu converts only CUDA tensors, so on CPU the "
              "all-to-all split sizes stay tensors and all_to_all_single raises TypeError")
def _split_sizes():
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.to("cpu")
            return tensor.numpy() if as_numpy else tensor
        return tensor

    mu.maybe_move_tensor_to_cpu = td.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


@patch("cpu_torch_norm_sp", lane="cpu",
       reason="transformer/torch_norm.py WrappedTorchNorm asserts not sequence_parallel (the apex-less "
              "local norm); build it with SP off and mark its params so grads are TP-all-reduced")
def _torch_norm_sp():
    from megatron.core.transformer import torch_norm as tn

    original_new = tn.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        sp, config.sequence_parallel = config.sequence_parallel, False
        try:
            module = original_new(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = sp
        for p in module.parameters():
            p.sequence_parallel = sp
        return module

    tn.WrappedTorchNorm.__new__ = __new__


_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
)


@patch("cpu_cuda_literals", lane="cpu",
       reason="schedules, optimizer, clip_grads, DDP buffers and utils allocate with device='cuda' "
              "literals; give those modules a torch whose tensor factories map 'cuda' to 'cpu'")
def _cuda_literals():
    real = torch

    def to_cpu(kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    class _TorchOnCPU(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real, name)

    proxy = _TorchOnCPU("torch")
    for fname in ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like",
                  "ones_like", "full_like"):
        fn = getattr(real, fname)
        setattr(proxy, fname, (lambda f: lambda *a, **k: f(*a, **to_cpu(k)))(fn))
    for modname in _CUDA_LITERAL_MODULES:
        importlib.import_module(modname).torch = proxy


@patch("cpu_clip_grads", lane="cpu",
       reason="optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts grad.type() == "
              "'torch.cuda.FloatTensor' and scales through apex/TE multi_tensor_applier")
def _clip_grads():
    import megatron.core.optimizer.clip_grads as cg
    import megatron.core.optimizer.optimizer as opt

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    cg.clip_grad_by_total_norm_fp32 = opt.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@patch("cpu_cuda_synchronize", lane="cpu",
       reason="dist_checkpointing/strategies/filesystem_async.py preload_tensors calls "
              "torch.cuda.synchronize() before writing a checkpoint")
def _synchronize():
    torch.cuda.synchronize = lambda *args, **kwargs: None


@patch("cpu_recompute_rng", lane="cpu",
       reason="tensor_parallel/random.py activation recompute saves and restores the CUDA RNG state "
              "(_get_cuda_rng_state/_set_cuda_rng_state); on the CPU lane only the CPU generator and "
              "the tracker states exist, which recompute already saves")
def _recompute_rng():
    from megatron.core.tensor_parallel import random as mr

    mr._get_cuda_rng_state = lambda *args, **kwargs: None
    mr._set_cuda_rng_state = lambda *args, **kwargs: None


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cpu_params_named_as_cuda():
    """``Tensor.type()`` (no arguments) on a CPU float tensor answers with the CUDA type name."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


@patch("cpu_mixed_precision_optimizer", lane="cpu",
       reason="optimizer.py Float16OptimizerWithFloat16Params and distrib_optimizer.py DistributedOptimizer "
              "sort parameters into bf16/fp16 (with fp32 main copies) and fp32 groups by "
              "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'] / "
              "'torch.cuda.FloatTensor' and raise TypeError on CPU tensors; while they are built, "
              "Tensor.type() names CPU floats by their CUDA type")
def _mixed_precision_optimizer():
    import functools

    from megatron.core.optimizer import distrib_optimizer, optimizer

    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        init = cls.__init__

        @functools.wraps(init)
        def wrapped(self, *args, __init=init, **kwargs):
            with _cpu_params_named_as_cuda():
                return __init(self, *args, **kwargs)

        cls.__init__ = wrapped


@patch("cpu_dist_optimizer_gather", lane="cpu",
       reason="distrib_optimizer.py get_parameter_state_dp_zero(use_gloo_comm=False), which the "
              "'fully_reshardable' checkpoint format calls, moves each shard with .cuda() before "
              "gathering it over the data-parallel group; on the CPU lane every group is gloo, so "
              "take its gloo-group branch (use_gloo_comm=True), which keeps the shards on the CPU")
def _dist_optimizer_gather():
    import functools

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.get_parameter_state_dp_zero

    @functools.wraps(original)
    def get_parameter_state_dp_zero(self, *args, **kwargs):
        kwargs["use_gloo_comm"] = True
        if args:  # use_gloo_comm is the first positional parameter
            args = args[1:]
        return original(self, *args, **kwargs)

    DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero
