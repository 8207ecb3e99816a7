"""mHC as a Megatron layer: initial mappings, gradients of a mixing site, training on the CPU lane
(dense, MoE inside mHC, static mode), and config errors."""

import pytest
import torch

from megatron_ext.config import MHCConfig
from tests.helpers import receipt, train_inprocess, train_losses

# Training runs use the torch mixers: the kernel tests set TRITON_INTERPRET=1 for the whole pytest
# process, and the interpreter is far too slow for a model; the kernels are tested in test_ops_mhc.
TORCH = ["--mhc-backend", "torch"]


class _Cfg:
    hidden_size = 6
    sequence_parallel = False


def _mixer(mode="dynamic", n=4):
    from megatron_ext.modules.mhc import StreamMixer

    return StreamMixer(_Cfg(), MHCConfig(num_streams=n, mode=mode, backend="torch")).double()


def test_initial_mappings_are_mean_in_identity_like_residual():
    mixer = _mixer()
    streams = torch.randn(3, 2, 4, 6, dtype=torch.float64)
    u, h_post, h_res, linked = mixer(streams)
    assert torch.equal(linked, streams)
    # alpha=0.01 makes the token-dependent part small: near 1/n, 1 and an identity-like H_res
    torch.testing.assert_close(u, streams.mean(dim=2), atol=0.05, rtol=0.05)
    torch.testing.assert_close(h_post, torch.ones_like(h_post), atol=0.05, rtol=0)
    assert (torch.diagonal(h_res, dim1=-2, dim2=-1) > 0.9).all()
    # 20 Sinkhorn iterations end on a column normalisation: columns exact, rows within the
    # finite-iteration error, which is largest for the diagonal-heavy start
    ones = torch.ones(3, 2, 4, dtype=h_res.dtype)
    torch.testing.assert_close(h_res.sum(-2), ones, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_res.sum(-1), ones, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_mixing_site_gradcheck(mode):
    mixer = _mixer(mode)
    with torch.no_grad():  # move away from the symmetric init so every path carries gradient
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    streams = torch.randn(2, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True)
    params = [p for p in mixer.parameters()]

    def site(x, f, *ps):
        u, h_post, h_res, x_link = mixer(x)
        return mixer.post(x_link, h_res, h_post, f * u.tanh())

    assert torch.autograd.gradcheck(site, (streams, branch, *params), eps=1e-6, atol=1e-5)


def test_mhc_model_trains(tmp_path):
    run = tmp_path / "mhc"
    assert train_inprocess(run, "--mhc-num-streams", "4", *TORCH, "--train-iters", "12", "--eval-iters", "0") == 0
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 1.5
    backends_used = {b["op"]: b for b in receipt(run)["backends"]}
    assert any(op.startswith("mhc_mix") for op in backends_used)
    # the presets are RMSNorm models: the sublayer norms are folded into the sites by default
    assert backends_used["mhc_norm_fold"]["observed"] == "on"


def test_full_activation_recompute_gives_the_same_losses(tmp_path, monkeypatch):
    from megatron.core import tensor_parallel

    calls = []
    original = tensor_parallel.checkpoint

    def counting_checkpoint(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(tensor_parallel, "checkpoint", counting_checkpoint)
    args = ["--mhc-num-streams", "4", *TORCH, "--train-iters", "4", "--eval-iters", "0"]
    plain = tmp_path / "plain"
    assert train_inprocess(plain, *args) == 0
    recomputed = tmp_path / "recompute"
    assert train_inprocess(recomputed, *args, "--recompute-granularity", "full",
                           "--recompute-num-layers", "1") == 0
    assert train_losses(recomputed) == pytest.approx(train_losses(plain), rel=1e-6)
    assert len(calls) == 4 * 2 * 2  # iterations x micro-batches x layers: every layer recomputed
    assert receipt(recomputed)["config"]["recompute_granularity"] == "full"


def test_moe_inside_mhc_and_static_mode_train(tmp_path):
    moe = tmp_path / "moe"
    assert train_inprocess(moe, "--mhc-num-streams", "4", *TORCH, "--num-experts", "4", "--train-iters", "8",
                           "--eval-iters", "0") == 0
    assert train_losses(moe)[-1] < train_losses(moe)[0] - 1.0
    static = tmp_path / "static"
    assert train_inprocess(static, "--mhc-num-streams", "3", *TORCH, "--mhc-mode", "static", "--train-iters", "8",
                           "--eval-iters", "0") == 0
    assert train_losses(static)[-1] < train_losses(static)[0] - 1.0


def _layer_config(normalization="RMSNorm", hidden=16, **extra):
    from megatron_ext import compat

    return compat.make_transformer_config(
        num_layers=2, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=2 * hidden,
        normalization=normalization, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, transformer_impl="local",
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, params_dtype=torch.float64, **extra)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_folded_norm_layer_equals_the_layer_with_separate_norms(mode):
    """The input RMSNorms folded into the sites (the default with RMSNorm): same parameters and
    checkpoint keys as the layer with separate norms, same output and every gradient (fp64);
    Megatron sees an identity there, so its selective "layernorm" recompute skips it."""
    from megatron.core.transformer.spec_utils import build_module

    from layer_specs.mhc import mhc_layer_spec
    from megatron_ext import backends
    from megatron_ext.modules.mhc import MHCFoldedNorm
    from megatron_ext.modules.norm import Norm
    from tests.helpers import cpu_model_parallel

    backends.reset()
    with cpu_model_parallel(5):
        def build(fold, **cfg):
            spec = mhc_layer_spec(MHCConfig(mode=mode, backend="torch", fold_norm=fold), normalization="RMSNorm")
            return build_module(spec, config=_layer_config(**cfg), layer_number=2).double()

        # (Megatron's norm recompute itself needs Transformer Engine: only its switch is checked)
        recompute = dict(recompute_granularity="selective", recompute_modules=["layernorm"])
        assert not build(True, **recompute).recompute_input_layernorm
        assert build(False, **recompute).recompute_input_layernorm
        folded, plain = build(True), build(False)
        assert isinstance(folded.input_layernorm, MHCFoldedNorm) and isinstance(folded.pre_mlp_layernorm, MHCFoldedNorm)
        assert type(plain.input_layernorm) is Norm and type(plain.pre_mlp_layernorm) is Norm
        assert folded.state_dict().keys() == plain.state_dict().keys()
        with torch.no_grad():  # norm weights away from 1, mixers away from their symmetric init
            for p in plain.parameters():
                p.add_(0.3 * torch.randn_like(p))
        folded.load_state_dict(plain.state_dict())
        assert [r for r in backends.records() if r["op"] == "mhc_norm_fold"][0]["observed"] == "on"

        x = torch.randn(5, 2, 4 * 16, dtype=torch.float64)
        grad = torch.randn_like(x)
        results = []
        for layer in (folded, plain):
            xi = x.clone().requires_grad_()
            out = layer(xi, attention_mask=None)[0]
            out.backward(grad)
            results.append((out.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
        (out_f, dx_f, g_f), (out_p, dx_p, g_p) = results
        torch.testing.assert_close(out_f, out_p, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx_f, dx_p, rtol=1e-10, atol=1e-10)
        assert g_f.keys() == g_p.keys() and all(g is not None for g in g_f.values())
        for name in g_f:
            torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("mode,fold", [("dynamic", True), ("static", True), ("dynamic", False)])
def test_every_parameter_is_read_after_its_modules_forward_hooks(mode, fold):
    """Megatron's DDP with --overlap-param-gather waits for a parameter's all-gather in the forward
    pre-hook of the module that owns it, so the layer must read each parameter only after that
    module was called. With every parameter NaN until its module's hooks run
    (tests.helpers.forward_with_late_params), the mHC layer gives the same output as plainly (the
    mixers are called as modules; the folded norm's hooks run before the site reads its weight)."""
    from megatron.core.transformer.spec_utils import build_module

    from layer_specs.mhc import mhc_layer_spec
    from tests.helpers import cpu_model_parallel, forward_with_late_params

    with cpu_model_parallel(5):
        spec = mhc_layer_spec(MHCConfig(mode=mode, backend="torch", fold_norm=fold), normalization="RMSNorm")
        layer = build_module(spec, config=_layer_config(), layer_number=2).double()
        x = torch.randn(5, 2, 4 * 16, dtype=torch.float64)
        want = layer(x, attention_mask=None)[0]
        (got, _), missed = forward_with_late_params(layer, x, attention_mask=None)
        assert got.isfinite().all(), (mode, fold)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert missed == [], missed


def test_norm_fold_needs_rmsnorm():
    """With LayerNorm the spec keeps separate norms (recorded why); a folded norm built on a
    LayerNorm config says what to change."""
    from layer_specs.mhc import mhc_layer_spec
    from megatron_ext import backends
    from megatron_ext.modules.mhc import MHCFoldedNorm
    from megatron_ext.modules.norm import Norm

    backends.reset()
    spec = mhc_layer_spec(MHCConfig(backend="torch"), normalization="LayerNorm")
    assert spec.submodules.input_layernorm is Norm and spec.submodules.pre_mlp_layernorm is Norm
    rec = [r for r in backends.records() if r["op"] == "mhc_norm_fold"][0]
    assert (rec["requested"], rec["observed"]) == ("on", "off") and "LayerNorm" in rec["reason"]
    with pytest.raises(ValueError, match="normalization='LayerNorm'.*fold_norm=false"):
        MHCFoldedNorm(_layer_config("LayerNorm"), 16)


@pytest.mark.parametrize("knob,megatron,pinned", [(False, False, False), (True, False, True),
                                                   (False, True, True)])
def test_deterministic_knobs_pin_the_kernel_tilings(monkeypatch, knob, megatron, pinned):
    """``mhc.deterministic`` or Megatron's ``deterministic_mode`` pins the fused kernels' tilings
    (process-wide) when the layer is built, and the receipt says which and why; neither leaves the
    autotuner's choice, also recorded."""
    from megatron.core.transformer.spec_utils import build_module

    from layer_specs.mhc import mhc_layer_spec
    from megatron_ext import backends
    from megatron_ext.config import TrainConfig, mhc_config
    from megatron_ext.ops import mhc as mhc_ops
    from tests.helpers import cpu_model_parallel

    monkeypatch.setattr(mhc_ops, "_PIN_TILINGS", False)  # restored afterwards: the flag is process-wide
    backends.reset()
    with cpu_model_parallel(5):
        spec = mhc_layer_spec(MHCConfig(backend="torch", deterministic=knob), normalization="RMSNorm")
        build_module(spec, config=_layer_config(deterministic_mode=megatron), layer_number=1)
    assert mhc_ops.tilings_pinned() is pinned
    rec = [r for r in backends.records() if r["op"] == "mhc_tilings"]
    assert len(rec) == 1, rec
    assert (rec[0]["requested"], rec[0]["observed"]) == (("pinned",) * 2 if pinned else ("autotuned",) * 2)
    assert ("Megatron's deterministic_mode" in rec[0]["reason"]) is (megatron and not knob)
    backends.reset()
    # megatron-ext train's flag reaches the layer's config
    assert mhc_config(TrainConfig(mhc_num_streams=4, mhc_deterministic=knob)).deterministic is knob


def test_mhc_deterministic_must_be_a_boolean():
    from megatron_ext.config import ConfigError

    with pytest.raises(ConfigError, match="mhc_deterministic='yes': must be a boolean"):
        MHCConfig(deterministic="yes").validate(16)


@pytest.mark.parametrize("argv,message", [
    (["--mhc-num-streams", "0"], "mhc_num_streams=0: must be a positive integer"),
    (["--mhc-num-streams", "4", "--mhc-sinkhorn-iters", "0"], "mhc_sinkhorn_iters=0"),
    (["--mhc-num-streams", "3", "--mhc-backend", "triton"], "mhc_backend='triton': the fused Triton lane is for num_streams=4, not 3"),
    (["--mhc-num-streams", "4", "--mhc-mode", "sometimes"], "mhc_mode='sometimes'"),
])
def test_mhc_config_errors(tmp_path, capsys, argv, message):
    from megatron_ext.cli import main

    assert main(["train", "--runs-root", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fp32_params_survive_a_precision_cast_and_move_with_the_module():
    """``fp32_params``: ``.bfloat16()`` (what Megatron's Float16Module does to the model) leaves the
    mixer's weights fp32 with their exact values; other casts and the default setting follow the
    module as usual."""
    from megatron_ext.modules.mhc import StreamMixer

    kept = StreamMixer(_Cfg(), MHCConfig(num_streams=4, backend="torch", fp32_params=True))
    plain = StreamMixer(_Cfg(), MHCConfig(num_streams=4, backend="torch"))
    with torch.no_grad():
        for p in kept.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # values that bf16 cannot hold
    before = {name: p.detach().clone() for name, p in kept.named_parameters()}
    wrapper = torch.nn.Sequential(kept, plain, torch.nn.Linear(6, 6)).bfloat16()
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
    for name, p in kept.named_parameters():
        assert torch.equal(p.detach(), before[name]), name   # not a round trip through bf16
        assert p.detach().to(torch.bfloat16).float().ne(p.detach()).any(), name
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert wrapper[2].weight.dtype == torch.bfloat16
    wrapper.double()   # not a 16-bit cast: applied
    assert {p.dtype for p in kept.parameters()} == {torch.float64}
    # a bf16 model step with fp32 mixer weights: bf16 branch input, fp32 gradients for the weights
    kept.float()
    streams = torch.randn(2, 1, 4, 6, dtype=torch.bfloat16)
    u, h_post, h_res, link = kept(streams)
    assert u.dtype == torch.bfloat16
    kept.post(link, h_res, h_post, u).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in kept.parameters())


def test_fp32_mixer_params_in_a_bf16_model_train_save_and_resume(tmp_path, monkeypatch):
    """--mhc-fp32-params under --bf16: Megatron's mixed-precision optimizer gets fp32 parameters
    next to its bf16 ones. Its checkpoint used to fail on them (KeyError); killed and resumed runs
    now continue the uninterrupted curve, with either optimizer."""
    from megatron_ext.training import checkpoint

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # bf16 is refused under the interpreter
    args = ["--mhc-num-streams", "4", *TORCH, "--mhc-fp32-params", "--train-iters", "6", "--save-interval", "3",
            "--eval-iters", "0", "--bf16"]
    full, killed, dist = tmp_path / "full", tmp_path / "killed", tmp_path / "dist"
    assert train_inprocess(full, *args) == 0
    assert train_inprocess(killed, *args, "--exit-after-iters", "5") == 0
    assert checkpoint.latest_iteration(killed / "checkpoints") == 3
    assert train_inprocess(killed, *args, "--resume") == 0
    losses = train_losses(full)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert train_losses(killed) == pytest.approx(losses, rel=1e-6)
    assert "float16_optimizer_fp32_params_checkpoint" in receipt(killed)["patches"]
    assert train_inprocess(dist, *args, "--use-distributed-optimizer", "--exit-after-iters", "5") == 0
    assert train_inprocess(dist, *args, "--use-distributed-optimizer", "--resume") == 0
    # the two optimizers reach the same bf16 weights by differently ordered fp32 steps: losses
    # agree to bf16-step noise (up to 2.2e-5 relative by step 6, measured with the folded norms)
    assert train_losses(dist) == pytest.approx(losses, rel=5e-5)
    assert "dist_optimizer_mixed_dtype_index" in receipt(dist)["patches"]
