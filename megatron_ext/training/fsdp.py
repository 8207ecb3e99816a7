"""FSDP2 for ``megatron-ext train`` (``--lanes fsdp2`` / ``--use-torch-fsdp2``).

Parameters, gradients and Adam states are sharded over the data-parallel group with torch's
``fully_shard`` (Zhao et al. 2023, "PyTorch FSDP"; the FSDP2 per-parameter DTensor design): one
FSDP unit per transformer layer, whose weights are all-gathered just before its forward and
backward and freed after, plus the root (embedding, final norm, output layer).

Why not Megatron's ``TorchFullyShardedDataParallel``: it builds its device mesh as "cuda" (no CPU
lane with gloo), takes no mixed-precision policy in 0.16.1, and Megatron's optimizers read
FSDP2 gradients differently in 0.16.1 and 0.19.2. Here the same code runs on both versions:

- mixed precision: the sharded parameters stay fp32 (they are the master weights); with bf16 the
  layers compute on bf16 copies gathered for each unit and gradients are reduce-scattered in fp32.
- optimizer: AdamW with Megatron's parameter groups (no weight decay on biases and 1-D weights) and
  Megatron's hyper-parameter fields, so ``OptimizerParamScheduler`` drives it unchanged; gradient
  clipping uses the norm over the sharded gradients (local sums of squares, all-reduced).
- checkpoints: Megatron's distributed format with the keys, layer stacking and optimizer layout
  that the replicated (DDP) lane writes, each rank writing its own rows. Either lane therefore
  resumes the other's checkpoints at any data-parallel size.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("megatron_ext.train")

_ADAM_STATES = ("exp_avg", "exp_avg_sq")
# Megatron matches saved and current parameter groups on these fields (optimizer.py).
_GROUP_ID = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _rows(n: int, rank: int, size: int) -> Tuple[int, int]:
    """Rows [start, stop) of dim 0 that FSDP2's Shard(0) gives ``rank`` (torch.chunk sizes)."""
    chunk = -(-n // size)
    return min(n, rank * chunk), min(n, (rank + 1) * chunk)


class FullyShardedGPT(torch.nn.Module):
    """A GPTModel with FSDP2 applied; ``module`` is the (sharded) GPTModel itself, so Megatron's
    schedule finds its config and ``set_input_tensor`` the way it does through DDP."""

    def __init__(self, model: torch.nn.Module, bf16: bool, device_type: str,
                 reshard_after_forward: bool = True):
        super().__init__()
        from megatron.core import parallel_state as ps
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        group = ps.get_data_parallel_group(with_context_parallel=True)
        self.mesh = DeviceMesh.from_group(group, device_type)
        self.group = group
        self.dp_rank = torch.distributed.get_rank(group)
        self.dp_size = torch.distributed.get_world_size(group)
        self.bf16 = bf16
        # Megatron tags parameters (tensor_model_parallel, allreduce, shared ...); fully_shard swaps
        # in new DTensor parameters, so carry the tags over.
        tags = {name: dict(vars(p)) for name, p in model.named_parameters()}
        self._layout = self._plain_layout(model)
        # cast_forward_inputs=False: the rotary angles reach each layer as an fp32 input, and a bf16
        # copy of angles up to seq_length radians would lose whole radians.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
        for layer in model.decoder.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        for name, p in model.named_parameters():
            for attr, value in tags.get(name, {}).items():
                if not hasattr(p, attr):
                    setattr(p, attr, value)
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        """Gradients live in each parameter's sharded ``.grad``; the optimizer drops them."""

    # -- checkpoint layout ----------------------------------------------------------------------
    def even(self, param) -> bool:
        """Whether dim 0 splits into equal row blocks: Megatron's checkpoint validation wants every
        shard of a tensor to have one shape, so other parameters are saved gathered (replicated)."""
        return param.shape[0] % self.dp_size == 0

    def entry(self, template, tensor, prefix: str = "", dtype: Optional[torch.dtype] = None):
        """``template`` (Megatron's sharded entry of a parameter, holding a DTensor) re-made for
        ``tensor`` (the parameter or an Adam state with its layout): this rank's rows when dim 0
        splits evenly, else the gathered tensor (a collective: every rank calls it in one order)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        key = f"{prefix}.{template.key}" if prefix else template.key
        if not self.even(tensor):
            full = tensor.full_tensor()
            return dataclasses.replace(template, key=key, data=full.to(dtype) if dtype else full)
        local = tensor.to_local()
        if dtype is not None:
            local = local.to(dtype)
        if isinstance(template, ShardedTensorFactory):
            # Megatron splits SwiGLU's fc1 into its gate and up halves; at TP=1 they tile dim 0 of
            # the parameter in order, so the stored tensor is the parameter's rows as they are.
            pieces = template.build_fn(template.key, torch.empty(tensor.shape, device="meta"),
                                       template.replica_id, None)
            shape = pieces[0]
        else:
            shape = template
        prepend = shape.prepend_axis_num
        if any(shape.global_offset[prepend:]) and not isinstance(template, ShardedTensorFactory):
            raise NotImplementedError(f"{template.key}: a tensor-parallel shard under FSDP2 ({shape}); "
                                      "FSDP2 runs with tensor_model_parallel_size=1")
        layer_axes = [(i, shape.global_offset[i], shape.axis_fragmentations[i]) for i in range(prepend)]
        return ShardedTensor.from_rank_offsets(key, local, *layer_axes, (prepend, self.dp_rank, self.dp_size),
                                               replica_id=0, prepend_axis_num=prepend)

    @staticmethod
    def _plain_layout(model) -> Dict[str, Any]:
        """Megatron's sharded state dict of the model before sharding, parameters as meta tensors:
        the keys, layer stacking and SwiGLU split of the DDP lane's checkpoints. Taken before
        ``fully_shard`` because Megatron's helpers treat DTensor parameters differently by version."""
        params = dict(model.named_parameters())
        out = {}
        for key, value in model.sharded_state_dict().items():
            if key in params:
                value = dataclasses.replace(value, data=torch.empty(params[key].shape, dtype=params[key].dtype,
                                                                    device="meta"))
            out[key] = value
        return out

    def _templates(self) -> Dict[str, Any]:
        # A forward-only pass (evaluation) leaves the root unit gathered; shard it again so that
        # every parameter reaches the checkpoint as the DTensor shard it is between steps.
        for unit in self.module.modules():
            if hasattr(unit, "reshard"):
                unit.reshard()
        return self._layout

    def sharded_state_dict(self, metadata=None) -> Dict[str, Any]:
        """The DDP lane's model sharded state dict with every parameter as this rank's rows (bf16
        copies under bf16, as the DDP lane stores bf16 model weights next to fp32 masters);
        persistent buffers as they are now. ``metadata`` (Megatron's, for the DDP lane's call
        signature) changes nothing here: the layout was taken at wrap time, with one pipeline stage."""
        templates = self._templates()
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        out = {}
        for key, value in templates.items():
            if key in params:
                value = self.entry(value, params[key], dtype=torch.bfloat16 if self.bf16 else None)
            elif key in buffers:
                value = dataclasses.replace(value, data=buffers[key])
            out[key] = value
        return out

    def copy_in(self, target, loaded: torch.Tensor) -> None:
        """Loaded rows (or the loaded whole tensor, for gathered parameters) into DTensor ``target``."""
        local = target.to_local()
        if not self.even(target):
            start, stop = _rows(target.shape[0], self.dp_rank, self.dp_size)
            loaded = loaded[start:stop]
        with torch.no_grad():
            local.copy_(loaded.reshape(local.shape))

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy loaded weights into the shards; buffers as they are. ``_extra_state`` entries carry
        nothing for this project's local-spec modules and are skipped."""
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        missing = [k for k in params if k not in state_dict and not getattr(params[k], "shared", False)]
        if strict and missing:
            raise KeyError(f"checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for key, value in state_dict.items():
            if key in params:
                self.copy_in(params[key], value)
            elif key in buffers and isinstance(value, torch.Tensor):
                with torch.no_grad():
                    buffers[key].copy_(value)


class ShardedAdam:
    """AdamW over the FSDP2 shards, with the interface of Megatron's optimizer that the train loop
    and the checkpoint module use (``step() -> (ok, grad_norm, zeros)``, ``param_groups``,
    ``sharded_state_dict``, ``load_state_dict``)."""

    def __init__(self, model: FullyShardedGPT, lr: float, min_lr: float, weight_decay: float,
                 betas: Tuple[float, float], clip_grad: float, eps: float = 1e-8):
        self.model = model
        self.clip_grad = clip_grad
        decay, no_decay = [], []
        for name, p in model.module.named_parameters():
            if p.requires_grad:
                (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).append((name, p))
        # The fields and the order (decayed group first) of Megatron's _get_param_groups, so that
        # checkpoints of either lane carry the same parameter groups.
        common = dict(is_expert_parallel=False, default_config=True, lr_mult=1.0, is_decoupled_lr=False,
                      max_lr=lr, min_lr=min_lr)
        groups = [dict(params=[p for _, p in named], wd_mult=mult, **common)
                  for named, mult in ((decay, 1.0), (no_decay, 0.0)) if named]
        self.named = decay + no_decay
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        """L2 norm of the whole gradient: the shards are disjoint, so their sums of squares add up."""
        sq = torch.zeros((), dtype=torch.float32, device=self.named[0][1].to_local().device)
        for _, p in self.named:
            if p.grad is not None:
                sq += p.grad.to_local().float().pow(2).sum()
        torch.distributed.all_reduce(sq, group=self.model.group)
        return float(sq.sqrt())

    @torch.no_grad()
    def step(self):
        norm = self.grad_norm()
        if self.clip_grad > 0:
            coeff = self.clip_grad / (norm + 1.0e-6)  # Megatron's clip_grad_norm_fp32 formula
            if coeff < 1.0:
                for _, p in self.named:
                    if p.grad is not None:
                        p.grad.to_local().mul_(coeff)
        self.optimizer.step()
        return True, norm, None

    # -- checkpoints ----------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Allocate Adam states before a load (AdamW creates them lazily at its first step)."""
        for _, p in self.named:
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                for k in _ADAM_STATES:
                    state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, metadata=None):
        """The layout of Megatron's FP32Optimizer (fp32 runs) or Float16OptimizerWithFloat16Params
        (bf16 runs: Adam states under ``optimizer``, the fp32 masters as ``fp32_from_fp16_params``).
        ``metadata`` (Megatron's format options, which only its distributed optimizer reads) is
        accepted for the same call signature and ignored."""
        from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

        if is_loading:
            self._init_state()
        templates = self.model._templates()
        state: Dict[Any, Any] = {}
        step = None
        for idx, (name, p) in enumerate(self.named):
            st = self.optimizer.state.get(p, {})
            if not st:
                continue
            step = st["step"]
            state[idx] = {k: self.model.entry(templates[name], st[k], prefix=f"optimizer.state.{k}")
                          for k in _ADAM_STATES}
        if step is not None:
            state["common_step"] = step.clone()
        groups, start = [], 0
        for g in self.optimizer.param_groups:
            saved = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            saved["params"] = LocalNonpersistentObject(list(range(start, start + len(g["params"]))))
            start += len(g["params"])
            groups.append(saved)
        optim = {"state": state, "param_groups": groups}
        if not self.model.bf16:
            return optim
        masters, start = [], 0
        for g in self.optimizer.param_groups:
            masters.append([self.model.entry(templates[name], p, prefix="optimizer.state.fp32_param")
                            for name, p in self.named[start:start + len(g["params"])]])
            start += len(g["params"])
        return {"optimizer": optim, "fp32_from_fp16_params": masters}

    def load_state_dict(self, state_dict) -> None:
        bf16_layout = "fp32_from_fp16_params" in state_dict
        if bf16_layout != self.model.bf16:
            saved, now = ("bf16", "fp32") if bf16_layout else ("fp32", "bf16")
            raise ValueError(f"bf16={self.model.bf16}: the checkpoint's optimizer was saved by a {saved} "
                             f"run, this run is {now}; resume with the same --bf16 setting")
        optim = state_dict["optimizer"] if bf16_layout else state_dict
        step = optim["state"].pop("common_step", None)
        for idx, (_, p) in enumerate(self.named):
            loaded = optim["state"].get(idx)
            if loaded is None:
                continue
            st = self.optimizer.state[p]
            for k in _ADAM_STATES:
                self.model.copy_in(st[k], loaded[k])
            if step is not None:
                st["step"] = torch.as_tensor(step, dtype=torch.float32).clone().cpu()
        by_id = {tuple(g.get(k) for k in _GROUP_ID): g for g in optim["param_groups"]}
        for g in self.optimizer.param_groups:
            saved = by_id.get(tuple(g.get(k) for k in _GROUP_ID))
            if saved is None:
                raise ValueError(f"optimizer parameter group {dict((k, g.get(k)) for k in _GROUP_ID)} is not "
                                 "in the checkpoint; resume with the same model and optimizer settings")
            g.update({k: v for k, v in saved.items() if k != "params"})
        if bf16_layout:
            flat = [t for group in state_dict["fp32_from_fp16_params"] for t in group]
            for (_, p), master in zip(self.named, flat):
                self.model.copy_in(p, master)
