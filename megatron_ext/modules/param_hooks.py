"""Forward pre-hooks for a parameter read outside its module's forward.

Megatron's DistributedDataParallel with ``--overlap-param-gather`` (the distributed optimizer)
waits for a bucket's parameter all-gather in the forward pre-hook of the module that owns each
parameter. Code that reads a submodule's weight without calling that submodule (a fused kernel
taking the weight, ``F.linear`` on an input that must not go through the module's own
communication) would read it before the wait: on other ranks' shards, last step's values. Such
code calls :func:`run_forward_pre_hooks` on the owning module first.
"""

from __future__ import annotations

import torch


def run_forward_pre_hooks(module: torch.nn.Module) -> None:
    """Run the forward pre-hooks ``module(...)`` would run (the global ones, then the module's
    own), with no inputs and without its forward. Their results are ignored: the hooks this is
    for (Megatron's param all-gather wait) look at the module, not at the inputs."""
    from torch.nn.modules import module as _module

    hooks = list(_module._global_forward_pre_hooks.items()) + list(module._forward_pre_hooks.items())
    with_kwargs = module._forward_pre_hooks_with_kwargs
    for hook_id, hook in hooks:
        if hook_id in with_kwargs:
            hook(module, (), {})
        else:
            hook(module, ())
