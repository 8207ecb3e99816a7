"""A small GPT pretrain driver for ``megatron.training`` (megatron-core >= 0.19 ships it; its
``pretrain_gpt.py`` script lives in the Megatron-LM repository, not in the wheel).

Takes Megatron's own flags, so ``--spec layer_specs.pretrain gpt_block_spec|mhc_block_spec`` (or
``layer_specs.mhc mhc_block_spec``, ``layer_specs.gpt gpt_block_spec``) selects this project's layers
and ``--megatron-ext-config`` / ``MEGATRON_EXT_CONFIG`` carries its knobs::

    MEGATRON_EXT_CONFIG=knobs.yaml torchrun --nproc-per-node 2 -m launch.pretrain_gpt \\
        --spec layer_specs.pretrain mhc_block_spec --mock-data \\
        --tokenizer-type NullTokenizer --vocab-size 256 --num-layers 2 --hidden-size 128 ... --bf16

Without Transformer Engine the parser's defaults become ``--transformer-impl local``,
``--no-rope-fusion`` and (without apex too) ``--no-gradient-accumulation-fusion``: Megatron's own
defaults would ask for TE kernels that are not there. Flags given on the command line still win.

Data: ``--mock-data`` (Megatron's MockGPTDataset) or ``--data-path`` prefixes; every rank builds
its own dataset (no TP broadcast), which keeps the driver short.
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional

# What Megatron's parser defaults to that needs Transformer Engine (or apex) kernels.
NO_TE_DEFAULTS = {"transformer_impl": "local", "apply_rope_fusion": False}
NO_FUSED_WGRAD_DEFAULTS = {"gradient_accumulation_fusion": False}


def no_te_defaults() -> dict:
    """Parser defaults this host needs: empty where Transformer Engine is installed."""
    from megatron_ext import compat

    out = {}
    if not compat.HAVE_TE:
        out.update(NO_TE_DEFAULTS)
        if not compat.HAVE_APEX:
            out.update(NO_FUSED_WGRAD_DEFAULTS)
    return out


def _extra_args(parser):
    from layer_specs.knobs import add_megatron_args

    parser.set_defaults(**no_te_defaults())
    if parser.get_default("eval_interval") is None:
        # 0.19 defaults it to None but sizes the validation set with train_iters // eval_interval
        # even under --eval-iters 0; Megatron-LM's long-standing default
        parser.set_defaults(eval_interval=1000)
    return add_megatron_args(parser)


def _datasets(num_samples, vp_stage: Optional[int] = None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer

    args = get_args()
    blend = None if args.mock_data else (args.data_path, None)
    config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
                              split=args.split or "99,1,0", tokenizer=get_tokenizer(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, path_to_cache=getattr(args, "data_cache_path", None))
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, config).build()


_datasets.is_distributed = True  # every rank builds and reads its own batches


def _loss(loss_mask, output_tensor):
    import torch

    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.detach().float()])}


def _forward_step(data_iterator, model):
    import torch

    batch = next(data_iterator)
    device = torch.cuda.current_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss, loss_mask)


def describe_layers(model_chunks) -> str:
    """One line per model chunk naming the layer, attention, core-attention, MLP and final-norm
    classes the spec built (consecutive equal layers collapsed), so a log shows what --spec chose."""
    def name(module):
        return type(module).__name__ if module is not None else "-"

    lines = []
    for i, chunk in enumerate(model_chunks):
        decoder = getattr(chunk, "decoder", None)
        if decoder is None:
            continue
        kinds: List[List] = []
        for layer in decoder.layers:
            attn = getattr(layer, "self_attention", None)
            kind = (f"{name(layer)}(attention={name(attn)}/{name(getattr(attn, 'core_attention', None))}, "
                    f"mlp={name(getattr(layer, 'mlp', None))})")
            if kinds and kinds[-1][1] == kind:
                kinds[-1][0] += 1
            else:
                kinds.append([1, kind])
        body = ", ".join(f"{n} x {kind}" for n, kind in kinds)
        lines.append(f"megatron-ext: model chunk {i}: {body}; final norm {name(getattr(decoder, 'final_layernorm', None))}")
        mtp = getattr(chunk, "mtp", None)
        for depth, module in enumerate(getattr(mtp, "layers", None) or (), 1):
            # megatron-core 0.19 names the MTP module's inner layer mtp_model_layer, 0.16.1 transformer_layer
            layer = getattr(module, "mtp_model_layer", None) or getattr(module, "transformer_layer", None)
            attn = getattr(layer, "self_attention", None)
            lines.append(f"megatron-ext: model chunk {i}: MTP depth {depth}: {name(layer)}(attention={name(attn)}/"
                         f"{name(getattr(attn, 'core_attention', None))}, mlp={name(getattr(layer, 'mlp', None))})")
    return "\n".join(lines)


def _print_layers(model_chunks):
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(describe_layers(model_chunks), flush=True)
    return model_chunks


def build(argv: Optional[List[str]] = None):
    """Megatron's args (parsed, validated, set global) and its PretrainConfigContainer."""
    import sys

    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    if argv is not None:  # Megatron's parser reads sys.argv only
        sys.argv = [sys.argv[0], *argv]
    args = parse_and_validate_args(extra_args_provider=_extra_args)
    model = gpt_config_from_args(args)
    model.pre_wrap_hooks.append(_print_layers)
    return args, pretrain_cfg_container_from_args(args, model)


def main(argv: Optional[List[str]] = None) -> None:
    import torch

    import patches
    from megatron_ext import compat

    if not compat.has_megatron_training():
        raise SystemExit(f"megatron-core={compat.mcore_version()}: has no megatron.training; "
                         "use megatron-core>=0.19 for Megatron's pretrain CLI, or `megatron-ext train`")
    compat.check_mcore_supported()
    # the version-guarded fixes every lane needs (mHC pipeline shapes, MoE without TE)
    patches.apply_patches("cuda" if torch.cuda.is_available() else "cpu")
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    _, cfg = build(argv)
    pretrain(cfg, _datasets, ModelType.encoder_or_decoder, _forward_step)


if __name__ == "__main__":
    main()
