"""Depth experiment: per-layer gradient norms of a deep, narrow GPT with a plain residual vs mHC.

    python scripts/mhc_depth.py --layers 32 --steps 60 --out docs/img/mhc_depth.png

Both models are the same Megatron GPTModel (this project's block spec), same seed, same data (the
shipped corpus through Megatron's pipeline), trained with AdamW; only the residual differs. For each
model the script records, every ``--every`` steps, the gradient norm of every transformer layer's
parameters, and reports the spread max/min across layers. The mHC residual should keep that spread
smaller (the paper's claim: gradients neither explode nor vanish with depth).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def layer_grad_norms(model) -> list:
    norms = []
    for layer in model.decoder.layers:
        sq = sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters() if p.grad is not None)
        norms.append(sq ** 0.5)
    return norms


def run(kind: str, args) -> dict:
    from megatron_ext import compat
    from megatron_ext import data as mdata
    from megatron_ext.config import from_preset
    from megatron_ext.training.model import build_gpt, transformer_config

    extra = {"mhc_num_streams": 4, "mhc_backend": "torch"} if kind == "mhc" else {}
    cfg = from_preset("test", num_layers=args.layers, hidden_size=args.hidden, seq_length=64,
                      micro_batch_size=8, **extra)
    compat.seed_model_parallel(args.seed)
    torch.manual_seed(args.seed)
    tconfig = transformer_config(cfg, "cpu", bf16=False)
    tok = mdata.ByteTokenizer()
    cache = Path(args.cache)
    prefix = mdata.resolve_data(None, cache, tok)
    train_ds, _ = mdata.build_gpt_datasets(prefix, tok, cfg.seq_length, args.seed,
                                           args.steps * cfg.micro_batch_size, 8, cache)
    it = mdata.make_data_iterator(train_ds, cfg.micro_batch_size, 0, 1, 0)
    model = build_gpt(cfg, tconfig, tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    history = []
    for step in range(1, args.steps + 1):
        batch = next(it)
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 1 or step % args.every == 0:
            norms = layer_grad_norms(model)
            history.append({"step": step, "loss": float(loss), "norms": norms,
                            "spread": max(norms) / max(min(norms), 1e-30)})
        opt.step()
    return {"kind": kind, "history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache", default="runs/.data-cache")
    p.add_argument("--out", default="docs/img/mhc_depth.png")
    args = p.parse_args()

    import torch.distributed as dist

    import patches
    from megatron_ext import compat
    from megatron_ext.training.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    patches.apply_patches("cpu")
    compat.initialize_model_parallel(1, 1, 1)
    results = [run("plain", args), run("mhc", args)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    for ax, res in zip(axes, results):
        for h in res["history"]:
            ax.semilogy(range(1, args.layers + 1), h["norms"], marker=".", label=f"step {h['step']} "
                        f"(max/min {h['spread']:.1f}x)")
        ax.set_title(f"{'plain residual' if res['kind'] == 'plain' else 'mHC n=4'}: "
                     f"{args.layers} layers, h={args.hidden}")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("gradient norm of the layer's parameters")
    fig.tight_layout()
    fig.savefig(out)
    for res in results:
        print(res["kind"], " ".join(f"step {h['step']}: loss {h['loss']:.3f} spread {h['spread']:.2f}x"
                                    for h in res["history"]))
    compat.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
