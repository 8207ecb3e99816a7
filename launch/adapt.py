"""Recipe adapter: a Megatron pretrain argument list -> the same recipe with this project's layers.

The adapted list selects this project's block spec through Megatron's ``--spec`` (the wrappers in
``layer_specs.pretrain`` read the knob file, see ``layer_specs/knobs.py``), drops flags that only
Transformer Engine layers or Megatron's own attention/MoE modules read, and moves the knobs of this
project's attention / MoE / mHC into a YAML knob file (``MEGATRON_EXT_CONFIG``). Model shape,
parallel lanes, optimizer and data flags pass through unchanged; flags the adapter has no rule for
are kept and listed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megatron_ext.config import REFUSED_MEGATRON_MOE_OPTIONS, ConfigError

Arg = Tuple[str, List[str]]  # ("--flag", [values])

SPEC_MODULE = "layer_specs.pretrain"

# Flags the adapter understands and passes through unchanged (model shape, lanes, MoE router, training).
PASSTHROUGH = {
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--kv-channels",
    "--group-query-attention", "--num-query-groups", "--seq-length", "--max-position-embeddings",
    "--position-embedding-type", "--rotary-base", "--rotary-percent", "--use-rotary-position-embeddings",
    "--normalization", "--norm-epsilon", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--qk-layernorm", "--make-vocab-size-divisible-by", "--init-method-std", "--attention-dropout",
    "--hidden-dropout", "--vocab-size", "--padded-vocab-size",
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
    "--virtual-pipeline-model-parallel-size", "--context-parallel-size", "--expert-model-parallel-size",
    "--expert-tensor-parallel-size", "--sequence-parallel", "--use-distributed-optimizer",
    "--overlap-grad-reduce", "--overlap-param-gather", "--use-torch-fsdp2",
    "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-aux-loss-coeff", "--moe-z-loss-coeff",
    "--moe-router-load-balancing-type", "--moe-router-score-function", "--moe-router-pre-softmax",
    "--moe-router-topk-scaling-factor", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
    "--moe-router-num-groups", "--moe-router-group-topk", "--moe-expert-capacity-factor",
    "--moe-token-drop-policy", "--moe-input-jitter-eps", "--moe-layer-freq", "--moe-router-dtype",
    "--moe-shared-expert-intermediate-size", "--moe-token-dispatcher-type",
    "--micro-batch-size", "--global-batch-size", "--train-iters", "--train-samples", "--lr", "--min-lr",
    "--lr-decay-style", "--lr-warmup-iters", "--lr-warmup-fraction", "--lr-decay-iters", "--weight-decay",
    "--clip-grad", "--adam-beta1", "--adam-beta2", "--adam-eps", "--seed", "--bf16", "--fp16",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--recompute-modules",
    "--data-path", "--split", "--mock-data", "--tokenizer-type", "--tokenizer-model", "--vocab-file",
    "--merge-file", "--save", "--load", "--save-interval", "--eval-interval", "--eval-iters", "--log-interval",
    "--distributed-backend", "--spec", "--transformer-impl", "--attention-backend",
}

# Flags that only Transformer Engine layers read: this project's specs use Megatron's local layers.
TE_ONLY = {"--tp-comm-overlap", "--fp8-format", "--fp8-recipe", "--fp8-amax-history-len",
           "--fp8-amax-compute-algo", "--fp8-param-gather", "--moe-permute-fusion", "--cross-entropy-fusion-impl"}
MLA_FLAGS = {"--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim",
             "--qk-pos-emb-head-dim", "--v-head-dim", "--rotary-scaling-factor", "--mscale", "--mscale-all-dim",
             "--cache-mla-latents", "--mla-down-proj-fusion"}
_MLA_TO_GQLA = {"--q-lora-rank": "q_lora_rank", "--kv-lora-rank": "kv_lora_rank", "--qk-head-dim": "qk_head_dim",
                "--qk-pos-emb-head-dim": "qk_pos_emb_head_dim", "--v-head-dim": "v_head_dim"}
_MOE_SPEC_FLAGS = {"--moe-grouped-gemm", "--moe-use-legacy-grouped-gemm"}


def read_args(path: str) -> Tuple[List[str], List[Arg]]:
    """(leading non-flag tokens such as a script name, [(flag, values)]) of an argument file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"from={path!r}: cannot read the argument file ({e.strerror}); "
                          "use a file of '--flag value' tokens") from None
    tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    head: List[str] = []
    args: List[Arg] = []
    for tok in tokens:
        if tok.startswith("--"):
            args.append((tok, []))
        elif args:
            args[-1][1].append(tok)
        else:
            head.append(tok)
    if not args:
        raise ConfigError(f"from={path!r}: no --flags found; use a Megatron pretrain argument list")
    return head, args


def write_args(path: str, head: List[str], args: List[Arg], comment: str) -> None:
    lines = [f"# {line}" for line in comment.splitlines()]
    if head:
        lines.append(" ".join(shlex.quote(t) for t in head))
    lines += [" ".join([flag, *(shlex.quote(v) for v in values)]) for flag, values in args]
    Path(path).write_text("\n".join(lines) + "\n")


@dataclasses.dataclass
class Change:
    kind: str  # removed | added | changed
    flag: str
    old: Optional[List[str]]
    new: Optional[List[str]]
    why: str

    def render(self) -> str:
        def show(values):
            return " ".join(values) if values else "(switch)"

        if self.kind == "removed":
            body = f"{self.flag} {show(self.old)}".rstrip()
        elif self.kind == "added":
            body = f"{self.flag} {show(self.new)}".rstrip()
        else:
            body = f"{self.flag} {show(self.old)} -> {show(self.new)}"
        return f"{self.kind:<8} {body:<58} {self.why}"


@dataclasses.dataclass
class AdaptReport:
    source: str
    out: str
    knobs_out: Optional[str]
    changes: List[Change]
    unknown: List[str]
    knobs: Dict[str, Dict[str, object]]
    args: List[Arg]

    def render(self) -> str:
        lines = [f"megatron-ext adapt: {self.source} -> {self.out}"]
        lines += [c.render() for c in self.changes] or ["(no changes: the recipe already uses this project's spec)"]
        if self.unknown:
            lines.append(f"kept, unknown to the adapter: {' '.join(self.unknown)}")
        if self.knobs_out:
            lines.append(f"knobs -> {self.knobs_out}: run with MEGATRON_EXT_CONFIG={self.knobs_out}")
        return "\n".join(lines)


class _Args:
    """An ordered flag list with edit operations that record the diff."""

    def __init__(self, args: List[Arg]):
        self.args = [(f, list(v)) for f, v in args]
        self.changes: List[Change] = []

    def get(self, flag: str) -> Optional[List[str]]:
        for f, v in self.args:
            if f == flag:
                return v
        return None

    def remove(self, flag: str, why: str) -> Optional[List[str]]:
        old = self.get(flag)
        if old is not None:
            self.args = [(f, v) for f, v in self.args if f != flag]
            self.changes.append(Change("removed", flag, old, None, why))
        return old

    def set(self, flag: str, values: List[str], why: str) -> None:
        old = self.get(flag)
        if old == values:
            return
        if old is None:
            self.args.append((flag, values))
            self.changes.append(Change("added", flag, None, values, why))
        else:
            self.args = [(f, values if f == flag else v) for f, v in self.args]
            self.changes.append(Change("changed", flag, old, values, why))


def adapt_args(args: List[Arg], attention: Optional[str] = None, moe: Optional[str] = None,
               mhc: Optional[int] = None) -> Tuple[List[Arg], List[Change], List[str], Dict[str, Dict[str, object]]]:
    if mhc is not None and mhc < 1:
        raise ConfigError(f"mhc={mhc}: the stream count must be positive; use an integer >= 1 (4 is the fused lane)")
    a = _Args(args)
    knobs: Dict[str, Dict[str, object]] = {}
    known = PASSTHROUGH | TE_ONLY | MLA_FLAGS | _MOE_SPEC_FLAGS
    unknown = [f for f, _ in args if f not in known]

    if a.get("--transformer-impl") not in (None, ["local"]):
        a.set("--transformer-impl", ["local"], "this project's specs are built from Megatron's local layers")
    a.remove("--attention-backend", "core attention comes from the spec (SDPA / this project's kernels)")
    for flag in sorted(TE_ONLY):
        a.remove(flag, "read only by Transformer Engine layers")

    if attention is None and a.get("--multi-latent-attention") is not None:
        raise ConfigError("multi_latent_attention=True: the recipe asks for MLA, which this project's specs "
                          "do not build; use --attention gqla (MLA's grouped replacement) or --attention sparse-mqa")
    if attention is not None and a.get("--multi-latent-attention") is not None:
        gqla_dims = {}
        for flag in sorted(MLA_FLAGS):
            old = a.remove(flag, f"{attention} replaces MLA" + (" (moved to the knob file)"
                                                                 if flag in _MLA_TO_GQLA and attention == "gqla" else ""))
            if old and flag in _MLA_TO_GQLA:
                gqla_dims[_MLA_TO_GQLA[flag]] = int(old[0])
        if attention == "gqla":
            knobs["gqla"] = gqla_dims
    if attention == "sparse-mqa":
        a.set("--group-query-attention", [], "sparse MQA: one shared K/V head")
        a.set("--num-query-groups", ["1"], "sparse MQA: one shared K/V head")
        knobs["sparse_attention"] = {"pattern": "W"}
    elif attention == "gqla":
        heads = int((a.get("--num-attention-heads") or ["0"])[0])
        groups = a.get("--num-query-groups")
        if groups is None:
            g = next((g for g in (8, 4, 2, 1) if heads and heads % g == 0), 1)
            a.set("--group-query-attention", [], "GQLA: G K/V up-projection blocks")
            a.set("--num-query-groups", [str(g)], "GQLA: G K/V up-projection blocks")
        knobs.setdefault("gqla", {})
    if moe == "fused":
        if a.get("--num-experts") is None:
            raise ConfigError("moe='fused': the recipe has no --num-experts; use a MoE recipe or drop --moe")
        for name, what in REFUSED_MEGATRON_MOE_OPTIONS.items():
            flag = "--" + name.replace("_", "-")
            if a.get(flag) is not None:
                raise ConfigError(f"{flag}: {what}, which the fused MoE layer does not implement; "
                                  "drop it from the recipe, or adapt without --moe fused (Megatron's MoELayer)")
        if a.get("--disable-bias-linear") is None:
            raise ConfigError("add_bias_linear=True: the recipe leaves Megatron's default on, which gives the "
                              "router and every expert a learned bias that the fused MoE layer does not "
                              "implement; add --disable-bias-linear to the recipe (as Megatron's MoE recipes "
                              "have it), or adapt without --moe fused (Megatron's MoELayer)")
        for flag in sorted(_MOE_SPEC_FLAGS):
            a.remove(flag, "the fused MoE layer has its own grouped GEMM")
        dispatcher = a.get("--moe-token-dispatcher-type")
        if dispatcher is not None and dispatcher != ["alltoall"]:
            a.set("--moe-token-dispatcher-type", ["alltoall"], "the fused MoE layer dispatches with all-to-all")
        knobs["moe"] = {"impl": "fused", "backend": "auto"}
    if mhc is not None:
        knobs["mhc"] = {"num_streams": mhc}
    spec_name = "mhc_block_spec" if mhc is not None else "gpt_block_spec"
    a.set("--spec", [SPEC_MODULE, spec_name], "this project's block spec (reads the knob file)")
    return a.args, a.changes, unknown, knobs


def adapt_file(source: str, attention: Optional[str] = None, moe: Optional[str] = None, mhc: Optional[int] = None,
               out: Optional[str] = None, knobs_out: Optional[str] = None) -> AdaptReport:
    head, args = read_args(source)
    new_args, changes, unknown, knobs = adapt_args(args, attention, moe, mhc)
    if out is None:
        out = str(Path(source).with_suffix("")) + ".adapted.args"
    if knobs and knobs_out is None:
        knobs_out = str(Path(out).with_suffix("")) + ".megatron_ext.yaml"
    if knobs:
        from layer_specs.knobs import dump

        dump(knobs, knobs_out)
    else:
        knobs_out = None
    note = f"adapted from {os.path.basename(source)} by megatron-ext adapt"
    if knobs_out:
        note += f"\nrun with MEGATRON_EXT_CONFIG={knobs_out}"
    write_args(out, head, new_args, note)
    return AdaptReport(source, out, knobs_out, changes, unknown, knobs, new_args)
