"""Megatron's selective recompute of MoE parts in the fused layer (--recompute-granularity selective
--recompute-modules moe / moe_act / shared_experts): the same forward and gradients, fewer bytes
held for backward.

"Bytes held" is measured the way the allocator sees it: every tensor autograd saves is caught by a
saved-tensor hook, and after the forward the distinct storages behind them are summed (a storage
freed by the activation recompute counts 0 then)."""

import pytest
import torch

from tests.helpers import receipt, train_inprocess, train_losses
from tests.test_moe_layer import megatron_world  # noqa: F401  (fixture)

S, B, H, E, F = 12, 2, 16, 4, 8


def held_bytes(forward):
    """(``forward()``'s output, bytes of the storages autograd keeps for backward after it)."""
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        kept[st._cdata] = st
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(st.nbytes() for st in kept.values())


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "squared_relu"])
def test_moe_ffn_recomputed_activation_same_grads_fewer_bytes(activation):
    from megatron_ext.ops.moe import moe_ffn

    torch.manual_seed(0)
    T, k, n1 = 40, 2, 2 * F if activation == "swiglu" else F
    x = torch.randn(T, H, dtype=torch.float64)
    w1 = torch.randn(E, H, n1, dtype=torch.float64) / 4
    w2 = torch.randn(E, F, H, dtype=torch.float64) / 3
    probs = torch.rand(T, k, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    idx[:5] = 0  # one busy expert; expert 3 may get none
    g = torch.randn(T, H, dtype=torch.float64)
    results = []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, probs, w1, w2)]
        out, held = held_bytes(lambda: moe_ffn(leaves[0], leaves[1], idx, leaves[2], leaves[3], activation,
                                               backend="torch", recompute_activation=recompute))
        out.backward(g)
        results.append((out.detach(), [t.grad for t in leaves], held))
    (y0, g0, held0), (y1, g1, held1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    # at least the activation's output, [T*k, F] fp64, is no longer held
    assert held0 - held1 >= T * k * F * 8, (held0, held1)


def test_recomputed_activation_survives_a_second_backward():
    """A retained graph: the storage is refilled once and the activation's backward rebuilds its
    graph the second time."""
    from megatron_ext.ops.moe.recompute import recomputed_activation
    from megatron_ext.ops.moe.reference import expert_activation

    torch.manual_seed(1)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h, state = recomputed_activation(x @ w1, "swiglu")
    y = state.release(h @ w2)
    assert h.untyped_storage().nbytes() == 0
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w1, w2), g, retain_graph=True)
    second = torch.autograd.grad(y, (x, w1, w2), g)
    want = torch.autograd.grad(expert_activation(x @ w1, "swiglu") @ w2, (x, w1, w2), g)
    for a, b, c in zip(first, second, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
        assert torch.equal(a, b)


def _layer(recompute_modules=None, **moe):
    from megatron_ext.config import from_preset
    from megatron_ext.modules.moe import FusedMoELayer
    from megatron_ext.training.model import transformer_config

    fields = dict(hidden_size=H, num_attention_heads=4, num_experts=E, moe_ffn_hidden_size=F,
                  moe_router_topk=2, moe_backend="torch")
    if recompute_modules:
        fields.update(recompute_granularity="selective", recompute_modules=recompute_modules)
    cfg = from_preset("test", **{**fields, **moe})
    layer = FusedMoELayer(transformer_config(cfg, "cpu", False))
    layer.set_layer_number(1)
    return layer


@pytest.mark.parametrize("modules", ["moe", "moe_act", "shared_experts", "moe_act,shared_experts"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_layer_recompute_same_output_and_grads_fewer_bytes(megatron_world, modules, deterministic):
    from megatron_ext import backends

    moe = dict(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True, moe_aux_loss_coeff=0.01,
               moe_z_loss_coeff=0.001, moe_deterministic=deterministic)
    backends.reset()
    base, layer = _layer(**moe), _layer(modules, **moe)
    layer.load_state_dict(base.state_dict())
    names = set(modules.split(","))
    assert (layer.recompute_layer, layer.recompute_act, layer.recompute_shared) == \
        ("moe" in names, "moe_act" in names, "shared_experts" in names)
    rec = {r["op"]: r for r in backends.records()}["moe_recompute"]
    assert rec["requested"] == ",".join(sorted(names))
    torch.manual_seed(2)
    x = torch.randn(S, B, H)
    g = torch.randn(S, B, H)
    results = []
    for mod in (base, layer):
        xi = x.clone().requires_grad_()
        (y, _), held = held_bytes(lambda: mod(xi))
        y.backward(g)
        grads = {n: p.grad for n, p in mod.named_parameters()}
        results.append((y.detach(), xi.grad, grads, held, mod.router_load_accum.clone()))
    (y0, dx0, gr0, held0, load0), (y1, dx1, gr1, held1, load1) = results
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert set(gr0) == set(gr1) and gr0["shared_gate_weight"].abs().sum() > 0
    for name in gr0:
        assert torch.equal(gr0[name], gr1[name]), name
    assert torch.equal(load0, load1)  # the router ran once: its statistics are not counted twice
    assert held1 < held0, (held0, held1)
    if modules == "moe":  # only the layer's input, routing and weights are left
        assert held0 - held1 > S * B * 2 * F * 4, (held0, held1)


def test_megatron_moe_layer_recompute_flag_recomputes_the_layer(megatron_world):
    """Megatron turns the deprecated --moe-layer-recompute into recompute_modules "moe"; the fused
    layer reads it from there."""
    import dataclasses

    from megatron_ext.modules.moe import FusedMoELayer

    tconfig = dataclasses.replace(_layer().config, moe_layer_recompute=True)
    assert tconfig.recompute_granularity == "selective" and "moe" in tconfig.recompute_modules
    assert FusedMoELayer(tconfig).recompute_layer


def test_recompute_modules_config_errors():
    from megatron_ext.config import ConfigError, from_preset, validate

    def check(message, **fields):
        cfg = from_preset("test", **fields)
        with pytest.raises(ConfigError, match=message):
            validate(cfg, 1)

    moe = dict(num_experts=4, moe_router_topk=2)
    check(r"^recompute_modules='moe': chooses what selective recompute recomputes, but "
          r"recompute_granularity='full'", recompute_granularity="full", recompute_modules="moe", **moe)
    check(r"^recompute_modules='moe,attn': unknown module\(s\) \['attn'\]", recompute_granularity="selective",
          recompute_modules="moe,attn", **moe)
    check(r"^recompute_modules='moe_act': \['moe_act'\] recompute MoE parts, but the model has no experts",
          recompute_granularity="selective", recompute_modules="moe_act")
    check(r"^recompute_modules='shared_experts': shared_experts: the model has no shared expert",
          recompute_granularity="selective", recompute_modules="shared_experts", **moe)
    check(r"^recompute_modules='moe_act': moe_act: Megatron recomputes the expert activation only in its "
          r"grouped-GEMM experts", recompute_granularity="selective", recompute_modules="moe_act",
          moe_impl="megatron", **moe)
    check(r"^recompute_modules='mla_up_proj': mla_up_proj recomputes Megatron's MLA up-projections",
          recompute_granularity="selective", recompute_modules="mla_up_proj")


def test_train_with_moe_recompute_gives_the_same_losses(tmp_path):
    """`megatron-ext train --recompute-granularity selective --recompute-modules ...` on a model with
    a dense first layer, a shared expert and the aux/z losses: the losses equal the run without
    recompute, and the receipt records what was recomputed."""
    model = ["--train-iters", "4", "--eval-iters", "0", "--num-layers", "2",
             "--num-experts", "4", "--moe-layer-freq", "[0,1]", "--moe-shared-expert-intermediate-size", "16",
             "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--moe-backend", "torch"]
    plain = tmp_path / "plain"
    assert train_inprocess(plain, *model) == 0
    selective = ["--recompute-granularity", "selective", "--recompute-modules"]
    # the last: the lane planner's recompute-moe lane, which sets the same Megatron options
    for name, flags, recorded in (("parts", [*selective, "moe_act,shared_experts,core_attn"], "moe_act,shared_experts"),
                                  ("layer", [*selective, "moe"], "moe"),
                                  ("lanes", ["--lanes", "recompute-moe"], "moe")):
        run = tmp_path / name
        assert train_inprocess(run, *model, *flags) == 0
        assert train_losses(run) == train_losses(plain), name
        records = {r["op"]: r for r in receipt(run)["backends"]}
        assert records["moe_recompute"]["requested"] == recorded
        assert "megatron_option.moe_grouped_gemm" not in records  # set for Megatron's moe_act check only


def count_calls(monkeypatch, calls: dict, key: str, cls, name: str) -> None:
    """Count in ``calls[key]`` every call of the method ``cls.name`` (for this test only)."""
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls[key] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)


def test_mlp_entry_recomputes_dense_mlps_not_the_fused_moe_layer(tmp_path, monkeypatch):
    """Megatron's 'mlp' entry is the dense MLP's: a TransformerLayer checkpoints its MLP unless it is
    Megatron's MoELayer, which the fused layer is not, so 'mlp' used to run the whole fused layer
    (router and statistics included) again in backward. Now, as with Megatron's MoELayer, the dense
    layer's MLP runs twice per step and the fused layer once (its own 'moe' entry recomputes what
    follows the router inside it)."""
    from megatron.core.transformer.mlp import MLP
    from megatron_ext.modules.moe import FusedMoELayer

    calls = {"dense": 0, "fused": 0, "routed": 0}
    count_calls(monkeypatch, calls, "dense", MLP, "forward")
    count_calls(monkeypatch, calls, "fused", FusedMoELayer, "forward")
    count_calls(monkeypatch, calls, "routed", FusedMoELayer, "_routed")
    model = ["--train-iters", "3", "--eval-iters", "0", "--num-layers", "2", "--num-experts", "4",
             "--moe-layer-freq", "[0,1]", "--moe-backend", "torch"]
    assert train_inprocess(tmp_path / "plain", *model) == 0
    once = dict(calls)
    assert once["dense"] > 0 and once["fused"] == once["routed"] > 0, once
    calls.update(dense=0, fused=0, routed=0)
    run = tmp_path / "run"
    assert train_inprocess(run, *model, "--recompute-granularity", "selective",
                           "--recompute-modules", "mlp,moe") == 0
    assert calls == {"dense": 2 * once["dense"], "fused": once["fused"], "routed": 2 * once["routed"]}, \
        (once, calls)
    records = {r["op"]: r for r in receipt(run)["backends"]}
    assert records["recompute_modules.mlp"]["observed"] == "dense MLPs only"
    assert records["moe_recompute"]["requested"] == "moe"
    assert "fused_moe_not_recomputed_as_mlp" in receipt(run)["patches"]


def test_layernorm_entry_recomputes_the_norms_without_transformer_engine(tmp_path, monkeypatch):
    """Megatron's 'layernorm' entry (CheckpointWithoutOutput around each layer's two input norms)
    died with a NameError without Transformer Engine (patch checkpoint_without_output_no_te): now
    each norm of the layers runs twice per step (the final norm once) and the losses equal the
    run without recompute."""
    from megatron_ext.modules.norm import Norm

    calls = {"norm": 0}
    count_calls(monkeypatch, calls, "norm", Norm, "forward")
    model = ["--train-iters", "3", "--eval-iters", "0", "--num-layers", "2"]
    assert train_inprocess(tmp_path / "plain", *model) == 0
    once = calls["norm"]
    calls["norm"] = 0
    run = tmp_path / "run"
    assert train_inprocess(run, *model, "--recompute-granularity", "selective",
                           "--recompute-modules", "layernorm") == 0
    assert once > 0 and once % 5 == 0, once   # 2 layers x 2 norms + the final norm, per micro-batch
    assert calls["norm"] == once // 5 * 9, (once, calls)
    assert train_losses(run) == train_losses(tmp_path / "plain")
    import megatron.core.tensor_parallel.random as rnd
    if not getattr(rnd, "HAVE_TE", False):
        assert "checkpoint_without_output_no_te" in receipt(run)["patches"]


def _script(*argv):
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    cmd = [sys.executable, str(ROOT / "scripts" / "moe_recompute.py"), "--check", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_recompute_script_checks_every_setting_on_cpu(tmp_path):
    """scripts/moe_recompute.py --tiny --check: a row per setting, each bitwise equal to no recompute."""
    import json

    proc = _script("--tiny", "--json", str(tmp_path / "rc.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bit for bit" in proc.stdout
    rows = json.loads((tmp_path / "rc.json").read_text())["rows"]
    assert [r["recompute_modules"] for r in rows] == ["(none)", "moe_act", "shared_experts", "moe"]
    assert all(r["equal_to_no_recompute"] for r in rows[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_gpu_layer_recompute_bf16(tmp_path, backend):
    """bf16 on the GPU's expert lanes (a subprocess: this process may hold the CPU lane's patches):
    every recompute setting gives the no-recompute output and gradients bit for bit (the kernels are
    deterministic for the same inputs) and holds less after the forward, "moe" far less; moe_act
    saves memory on grouped_mm, where the activation's output would otherwise be kept."""
    import json

    proc = _script("--backend", backend, "--tokens", "2048", "--hidden", "512", "--ffn", "256",
                   "--num-experts", "8", "--topk", "2", "--shared-expert", "512", "--iters", "3",
                   "--warmup", "1", "--json", str(tmp_path / "rc.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["recompute_modules"]: r for r in json.loads((tmp_path / "rc.json").read_text())["rows"]}
    held = {name: r["held_after_forward_mib"] for name, r in rows.items()}
    assert held["moe"] < 0.2 * held["(none)"] and held["shared_experts"] < held["(none)"], held
    if backend == "grouped_mm":
        assert held["moe_act"] < held["(none)"], held
