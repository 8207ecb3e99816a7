"""A small GPT pretrain driver for ``megatron.training`` (megatron-core >= 0.19 ships it; its
``pretrain_gpt.py`` script lives in the Megatron-LM repository, not in the wheel).

Takes Megatron's own flags, so ``--spec layer_specs.pretrain gpt_block_spec|mhc_block_spec`` selects
this project's layers and ``--megatron-ext-config`` / ``MEGATRON_EXT_CONFIG`` carries its knobs::

    MEGATRON_EXT_CONFIG=knobs.yaml torchrun --nproc-per-node 2 -m launch.pretrain_gpt \\
        --spec layer_specs.pretrain mhc_block_spec --transformer-impl local --mock-data \\
        --tokenizer-type NullTokenizer --vocab-size 256 --num-layers 2 --hidden-size 128 ... --bf16

Data: ``--mock-data`` (Megatron's MockGPTDataset) or ``--data-path`` prefixes; every rank builds
its own dataset (no TP broadcast), which keeps the driver short.
"""

from __future__ import annotations

from functools import partial


def _datasets(num_samples):
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


def main() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from layer_specs.knobs import add_megatron_args

    args = parse_and_validate_args(extra_args_provider=add_megatron_args)
    cfg = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(cfg, _datasets, ModelType.encoder_or_decoder, _forward_step)


if __name__ == "__main__":
    main()
