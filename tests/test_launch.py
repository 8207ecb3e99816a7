"""launch/: `plan` CLI, `train --lanes` (errors in-process, one world-size-2 gloo launch), recipe
adapter round trips, the knob file of Megatron's pretrain CLI, and the launch scripts' dry runs."""

import json
import math
import re
import subprocess
import sys
import types

import pytest

from megatron_ext.cli import main
from tests.helpers import ROOT, cpu_model_parallel, receipt, subprocess_env, train_losses, train_torchrun

DENSE = ["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32",
         "--ffn-hidden-size", "11008", "--seq-length", "4096", "--global-batch-size", "512", "--vocab-size", "32000"]


def test_plan_prints_the_table_and_estimates(capsys):
    assert main(["plan", *DENSE, "--nodes", "2", "--gpus-per-node", "8", "--hardware", "h200-141g"]) == 0
    out = capsys.readouterr().out
    assert "2 nodes x 8 x h200-141g (world 16)" in out and "target train" in out
    for lane in ("tp ", "sp ", "pp ", "vpp ", "cp ", "ep ", "etp ", "dp ", "micro_batch_size ", "recompute "):
        assert any(line.startswith(lane) for line in out.splitlines()), lane
    assert "memory per GPU (GiB): weights" in out and "(fits)" in out
    assert "step time (s): compute" in out and "tokens/s, MFU" in out


def test_plan_json_is_machine_readable(capsys):
    assert main(["plan", *DENSE, "--hardware", "b200-192g", "--target", "megatron", "--json",
                 "--lanes", "tp2,sp"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["lanes"]["tp"] == 2 and plan["lanes"]["sp"] is True and plan["pinned"] == "tp2,sp"
    assert plan["cluster"] == {"nodes": 1, "gpus_per_node": 8, "world_size": 8, "hardware": "b200-192g"}
    mem = plan["memory_gib"]
    parts = ("weights", "grads", "optimizer", "activations", "attention_workspace", "overhead")
    assert mem["total"] == pytest.approx(sum(mem[k] for k in parts)) and mem["total"] < mem["capacity"]
    assert plan["time_s"]["step"] > plan["time_s"]["compute"] > 0 and plan["tokens_per_s"] > 0
    assert plan["reasons"]["tp"].startswith("pinned")


def test_plan_explicit_flags_pin_lanes(capsys):
    assert main(["plan", *DENSE, "--tensor-model-parallel-size", "4", "--sequence-parallel", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["lanes"]["tp"], plan["lanes"]["sp"], plan["lanes"]["dp"]) == (4, True, 2)


@pytest.mark.parametrize("argv,expected", [
    (["plan", *DENSE, "--lanes", "tp3"], "lanes='tp3': tp*pp*cp = 3*1*1 = 3 does not divide the world size 8"),
    (["plan", *DENSE, "--hardware", "a100"], "hardware='a100': unknown hardware profile"),
    (["plan", *DENSE, "--lanes", "tp2", "--tensor-model-parallel-size", "4"],
     "lanes='tp2': pins tp2 but --tensor-model-parallel-size 4 was also given; use one of them"),
    (["train", "--preset", "test", "--lanes", "fsdp2,tp2", "--device", "cpu", "--nproc-per-node", "2"],
     "lanes='fsdp2,tp2': tensor_model_parallel_size=2: FSDP2 in train shards over data parallelism only"),
    (["train", "--preset", "test", "--lanes", "dp", "--use-torch-fsdp2", "--device", "cpu", "--nproc-per-node", "2"],
     "lanes='dp': pins dp but --use-torch-fsdp2 was also given; use one of them"),
    (["train", "--preset", "test", "--lanes", "tp2,nosp", "--sequence-parallel", "--device", "cpu",
      "--nproc-per-node", "2"], "lanes='tp2,nosp': pins nosp but --sequence-parallel was also given"),
    (["train", "--preset", "test", "--lanes", "tp2,bogus", "--device", "cpu"], "unknown token 'bogus'"),
])
def test_lane_errors_are_one_line_before_any_launch(tmp_path, capsys, argv, expected):
    rc = main([*argv, "--runs-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("megatron-ext: error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.multirank
def test_lanes_map_onto_a_world_size_2_gloo_launch(tmp_path):
    run = tmp_path / "lanes_tp2sp"
    proc = train_torchrun(run, 2, "--lanes", "tp2,sp", "--train-iters", "4", "--eval-iters", "0",
                          "--lr-warmup-iters", "1", "--save-interval", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lanes tp2,sp,pp1,cp1,ep1,etp1,dp1,mbs4,recompute-none" in proc.stderr
    lane = receipt(run)["lane"]
    assert (lane["tp"], lane["sp"], lane["pp"], lane["dp"], lane["world_size"]) == (2, True, 1, 1, 2)
    config = json.loads((run / "config.json").read_text())
    assert config["lanes"] == "tp2,sp" and config["tensor_model_parallel_size"] == 2


# -- recipe adapter ---------------------------------------------------------------------------------

RECIPES = ROOT / "launch" / "recipes"


def _adapt(tmp_path, capsys, recipe, *swaps):
    out = tmp_path / f"{recipe}.adapted.args"
    assert main(["adapt", "--from", str(RECIPES / f"{recipe}.args"), *swaps, "--out", str(out)]) == 0
    return out, capsys.readouterr().out


def test_adapter_mixtral_round_trip(tmp_path, capsys):
    from launch.adapt import read_args

    out, report = _adapt(tmp_path, capsys, "mixtral_8x7b", "--attention", "sparse-mqa", "--moe", "fused", "--mhc", "4")
    assert "changed  --transformer-impl transformer_engine -> local" in report
    assert "removed  --attention-backend flash" in report and "removed  --moe-grouped-gemm" in report
    assert "changed  --num-query-groups 8 -> 1" in report
    assert "added    --spec layer_specs.pretrain mhc_block_spec" in report
    assert "kept, unknown to the adapter: --log-throughput" in report
    _, src = read_args(str(RECIPES / "mixtral_8x7b.args"))
    _, new = read_args(str(out))
    src_d, new_d = dict(src), dict(new)
    # everything not in the diff is carried over verbatim, unknown flags included
    for flag in ("--num-layers", "--num-experts", "--expert-model-parallel-size", "--data-path", "--log-throughput"):
        assert new_d[flag] == src_d[flag]
    assert "--moe-grouped-gemm" not in new_d and new_d["--spec"] == ["layer_specs.pretrain", "mhc_block_spec"]
    from layer_specs.knobs import load

    knobs = load(str(out.with_suffix("")) + ".megatron_ext.yaml")
    assert knobs == {"mhc": {"num_streams": 4}, "moe": {"backend": "auto", "impl": "fused"},
                     "sparse_attention": {"pattern": "W"}}
    # adapting the adapted recipe again changes nothing
    again = tmp_path / "again.args"
    assert main(["adapt", "--from", str(out), "--attention", "sparse-mqa", "--moe", "fused", "--mhc", "4",
                 "--out", str(again)]) == 0
    assert "(no changes" in capsys.readouterr().out and read_args(str(again))[1] == new


def test_adapter_deepseek_mla_becomes_gqla(tmp_path, capsys):
    from launch.adapt import read_args
    from layer_specs.knobs import load

    out, report = _adapt(tmp_path, capsys, "deepseek_v2_lite", "--attention", "gqla", "--moe", "fused")
    assert "removed  --multi-latent-attention" in report and "moved to the knob file" in report
    assert "changed  --moe-token-dispatcher-type flex -> alltoall" in report
    new = dict(read_args(str(out))[1])
    assert "--kv-lora-rank" not in new and new["--num-query-groups"] == ["8"]
    assert new["--moe-layer-freq"] == ["([0]+[1]*26)"]  # quoting survives the round trip
    assert load(str(out.with_suffix("")) + ".megatron_ext.yaml")["gqla"] == {
        "kv_lora_rank": 512, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128}


@pytest.mark.parametrize("argv,expected", [
    (["--from", "deepseek_v2_lite"], "multi_latent_attention=True: the recipe asks for MLA"),
    (["--from", "missing"], "cannot read the argument file"),
    (["--from", "mixtral_8x7b", "--mhc", "0"], "mhc=0: the stream count must be positive"),
    (["--from", "rank_capacity", "--moe", "fused"],
     "--moe-expert-rank-capacity-factor: drops tokens by a per-rank capacity of Megatron's flex dispatcher"),
    (["--from", "biased", "--moe", "fused"],
     "add_bias_linear=True: the recipe leaves Megatron's default on"),
])
def test_adapter_errors(tmp_path, capsys, argv, expected):
    mixtral = (RECIPES / "mixtral_8x7b.args").read_text()
    # an option the fused layer does not implement; a recipe without --disable-bias-linear
    (tmp_path / "rank_capacity.args").write_text(mixtral + "\n--moe-expert-rank-capacity-factor 1.5\n")
    (tmp_path / "biased.args").write_text(mixtral.replace("--disable-bias-linear", ""))
    argv = [a if a not in ("deepseek_v2_lite", "missing", "mixtral_8x7b", "rank_capacity", "biased") else
            str((tmp_path if a in ("rank_capacity", "biased") else RECIPES) / f"{a}.args") for a in argv]
    assert main(["adapt", *argv, "--out", str(tmp_path / "x.args")]) == 2
    assert expected in capsys.readouterr().err


# -- knob file for Megatron's pretrain CLI ------------------------------------------------------------

def test_knobs_reach_the_transformer_config(tmp_path, monkeypatch):
    from layer_specs import knobs
    from megatron_ext.config import ConfigError, MHCConfig, MoEConfig

    path = tmp_path / "k.yaml"
    path.write_text("mhc:\n  num_streams: 2\n  sinkhorn_iters: 5\nmoe:\n  impl: fused\n")
    monkeypatch.setenv(knobs.ENV, str(path))
    transformer = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, num_query_groups=None)
    model_config = types.SimpleNamespace(transformer=transformer)  # the 0.19 GPTModelConfig shape
    knobs.apply(model_config)
    assert transformer.mhc == MHCConfig(num_streams=2, sinkhorn_iters=5) and transformer.mhc_num_streams == 2
    assert transformer.moe == MoEConfig(impl="fused") and transformer.gqla is None
    # a config that already carries a knob (the megatron-ext train path) keeps it
    own = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, mhc=MHCConfig(num_streams=4))
    assert knobs.knobs_for(own)["mhc"].num_streams == 4
    path.write_text("mhc:\n  streams: 2\n")
    with pytest.raises(ConfigError, match=r"mhc.streams=2: unknown knob; use one of \[.*'num_streams'"):
        knobs.knobs_for(types.SimpleNamespace(hidden_size=64))
    path.write_text("moe:\n  backend: cuda\n")
    with pytest.raises(ConfigError, match=r"moe.backend='cuda': unknown expert backend; use one of \['auto'"):
        knobs.knobs_for(types.SimpleNamespace(hidden_size=64))
    path.write_text("moe:\n  backend: torch\n  pregather: true\n")
    with pytest.raises(ConfigError, match=r"moe.pregather=True: only the Triton expert kernels"):
        knobs.knobs_for(types.SimpleNamespace(hidden_size=64))
    path.write_text("attention: {}\n")
    with pytest.raises(ConfigError, match=r"unknown section 'attention'"):
        knobs.knobs_for(types.SimpleNamespace(hidden_size=64))
    monkeypatch.delenv(knobs.ENV)
    assert all(v is None for v in knobs.knobs_for(types.SimpleNamespace(hidden_size=64)).values())


# -- scripts ----------------------------------------------------------------------------------------

def _bash(*argv, env=None):
    return subprocess.run(["bash", *argv], cwd=ROOT, capture_output=True, text=True, env=env or subprocess_env(),
                          timeout=60)


def test_single_node_script_dry_run():
    proc = _bash("launch/torchrun_single.sh", "--gpus", "4", "--hardware", "h200", "--dry-run", "--",
                 "--preset", "small", "--lanes", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "NCCL_NVLS_ENABLE=0" in proc.stdout and "CUDA_DEVICE_MAX_CONNECTIONS=1" in proc.stdout
    assert ("-m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 4 -m megatron_ext train "
            "--preset small --lanes auto") in proc.stdout


def test_multi_node_script_dry_run_static_and_c10d():
    # an earlier in-process run leaves MASTER_ADDR/MASTER_PORT in this process's environment
    clean = {k: v for k, v in subprocess_env().items()
             if k not in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RDZV_ENDPOINT")}
    env = dict(clean, NNODES="2", NODE_RANK="1", MASTER_ADDR="node0")
    proc = _bash("launch/torchrun_multi.sh", "--dry-run", "--", "--lanes", "auto", env=env)
    assert proc.returncode == 0, proc.stderr
    assert ("--nnodes 2 --nproc-per-node 8 --node-rank 1 --master-addr node0 --master-port 29500 "
            "-m megatron_ext train --lanes auto") in proc.stdout
    proc = _bash("launch/torchrun_multi.sh", "--nnodes", "4", "--rdzv-endpoint", "head:29400", "--dry-run",
                 env=clean)
    assert "--rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id megatron-ext" in proc.stdout
    bad = _bash("launch/torchrun_multi.sh", "--nnodes", "2", "--dry-run", env=clean)
    assert bad.returncode == 2 and "master_addr unset" in bad.stderr and "usage:" in bad.stderr


@pytest.mark.multirank
def test_multi_node_script_runs_two_nodes_on_one_host(tmp_path):
    """launch/torchrun_multi.sh for real: two "nodes" of one process each on this host (static
    rendezvous, gloo on CPU) train as one data-parallel world of 2, step for step equal to a one-node
    world-size-2 run of the same flags."""
    from megatron_ext.training.distributed import free_port

    clean = {k: v for k, v in subprocess_env().items()
             if k not in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RDZV_ENDPOINT")}
    env = dict(clean, PYTHON=sys.executable)
    run, ref = tmp_path / "two_nodes", tmp_path / "one_node"
    train = ["--preset", "test", "--runs-root", str(tmp_path), "--run-dir", str(run), "--progress", "log",
             "--device", "cpu", "--data-cache-dir", str(tmp_path / ".data-cache"), "--train-iters", "4",
             "--eval-iters", "0", "--lr-warmup-iters", "1", "--save-interval", "4"]
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", "launch/torchrun_multi.sh", "--nnodes", "2", "--node-rank", str(r),
                               "--master-addr", "127.0.0.1", "--master-port", port, "--gpus", "1", "--", *train],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    lane = receipt(run)["lane"]
    assert (lane["world_size"], lane["dp"], lane["tp"]) == (2, 2, 1), lane
    proc = train_torchrun(ref, 2, "--train-iters", "4", "--eval-iters", "0", "--lr-warmup-iters", "1",
                          "--save-interval", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(train_losses(run)) == 4
    assert train_losses(run) == train_losses(ref)


def test_slurm_example_dry_run_and_nccl_profiles():
    proc = _bash("launch/slurm_example.sbatch", "--lanes", "auto", env=dict(subprocess_env(), DRY_RUN="1"))
    assert proc.returncode == 0, proc.stderr
    assert "srun --ntasks-per-node=1" in proc.stdout and "--rdzv-backend c10d" in proc.stdout
    bad = _bash("launch/nccl_env.sh", "a100")
    assert bad.returncode == 2 and "profile=a100: unknown" in bad.stderr
    for script in ("torchrun_single.sh", "torchrun_multi.sh", "nccl_env.sh", "slurm_example.sbatch"):
        assert "set -euo pipefail" in (ROOT / "launch" / script).read_text()


# -- Megatron's own pretrain CLI with --spec (GPU lane, megatron-core >= 0.19) ----------------------

PRETRAIN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--num-layers", "2",
            "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
            "--max-position-embeddings", "128", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--train-iters", "10", "--lr", "1e-3", "--bf16", "--normalization", "RMSNorm", "--swiglu",
            "--disable-bias-linear", "--position-embedding-type", "rope", "--attention-dropout", "0",
            "--hidden-dropout", "0", "--eval-iters", "0", "--log-interval", "1", "--save-interval", "10"]

# (name, --spec, knob file, extra flags): the mHC runs keep their mixer weights fp32 in the bf16
# model (Float16 optimizer in one, the distributed optimizer in the other); the wrappers with the env channel, the spec modules
# themselves with the flag channel (mHC + sparse attention + fused MoE, layer 1 dense by Megatron's
# --moe-layer-freq, under the distributed optimizer with the overlapped grad reduce, as the launch
# scripts' Megatron target runs, and the overlapped param gather), and the plain dense block
# the deterministic cases' fused MoE layers: Megatron's --deterministic-mode turns their deterministic
# mode on (Triton experts, fixed-tiling router GEMM) under torch's deterministic algorithms
DET_MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"]
PRETRAIN_CASES = [
    ("pretrain_mhc", ["layer_specs.pretrain", "mhc_block_spec"], "mhc:\n  num_streams: 4\n  fp32_params: true\n",
     [], "env"),
    ("mhc_sparse_moe", ["layer_specs.mhc", "mhc_block_spec"],
     ("mhc:\n  num_streams: 2\n  fp32_params: true\nsparse_attention:\n  pattern: WD\n  window_size: 32\n  num_sink_tokens: 2\n"
      "moe:\n  impl: fused\n"),
     ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
      "--moe-layer-freq", "([0]+[1]*1)", "--use-distributed-optimizer", "--overlap-grad-reduce",
      "--overlap-param-gather"], "flag"),
    ("gpt_dense", ["layer_specs.gpt", "gpt_block_spec"], None, [], None),
    # pretrain_mhc again with every layer captured and replayed by Megatron's own CUDA graphs
    ("mhc_cuda_graphs", ["layer_specs.pretrain", "mhc_block_spec"],
     "mhc:\n  num_streams: 4\n  fp32_params: true\n", ["--cuda-graph-impl", "local"], "env"),
    # mHC + sparse attention + the fused MoE layer, every layer captured by Megatron's local CUDA
    # graphs (the fused layer never synchronises with the host)
    ("mhc_sparse_moe_cuda_graphs", ["layer_specs.mhc", "mhc_block_spec"],
     ("mhc:\n  num_streams: 2\n  fp32_params: true\nsparse_attention:\n  pattern: WD\n  window_size: 32\n  num_sink_tokens: 2\n"
      "moe:\n  impl: fused\n"),
     ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
      "--moe-layer-freq", "([0]+[1]*1)", "--use-distributed-optimizer", "--cuda-graph-impl", "local"], "flag"),
    # twice under Megatron's --deterministic-mode (the first also with the mhc knob): pinned
    # tilings, so the two runs' losses are equal to every printed digit
    ("mhc_deterministic", ["layer_specs.pretrain", "mhc_block_spec"],
     "mhc:\n  num_streams: 4\n  deterministic: true\nmoe:\n  impl: fused\n", ["--deterministic-mode", *DET_MOE],
     "env"),
    ("mhc_deterministic_again", ["layer_specs.pretrain", "mhc_block_spec"],
     "mhc:\n  num_streams: 4\nmoe:\n  impl: fused\n", ["--deterministic-mode", *DET_MOE], "env"),
    # and once more replayed by Megatron's local CUDA graphs: the same tilings, so the eager runs'
    # losses bit for bit (autotuned, a graphed run can differ from its eager twin in the last
    # digits: each process times its own tilings)
    ("mhc_deterministic_cuda_graphs", ["layer_specs.pretrain", "mhc_block_spec"],
     "mhc:\n  num_streams: 4\nmoe:\n  impl: fused\n", ["--deterministic-mode", "--cuda-graph-impl", "local",
                                                          *DET_MOE], "env"),
    # the fused MoE layer's router state under Megatron's own loop: its finalize_model_grads moves
    # the aux-loss-free bias and the quantile-balancing bias, which stay fp32 in the bf16 model
    ("moe_expert_bias", ["layer_specs.moe", "moe_block_spec"], None,
     ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-score-function", "sigmoid",
      "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
      "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3"], None),
    ("moe_quantile_balancing", ["layer_specs.moe", "moe_block_spec"], None,
     ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "quantile_balancing"],
     None),
    # Megatron's latent MoE (which its own MoELayer builds from Transformer Engine only) with the
    # gate on the expert input (Llama-4 style, top-1) and a shared expert, and its random-logit
    # benchmark router
    ("moe_latent_probs_on_input", ["layer_specs.moe", "moe_block_spec"], None,
     ["--num-experts", "4", "--moe-router-topk", "1", "--moe-apply-probs-on-input", "--moe-latent-size", "128",
      "--moe-router-score-function", "sigmoid", "--moe-shared-expert-intermediate-size", "256"], None),
    ("moe_forced_balance", ["layer_specs.moe", "moe_block_spec"], None,
     ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-force-load-balancing",
      "--moe-aux-loss-coeff", "1e-2"], None),
    # DeepSeek-V3's multi-token prediction under mHC with the fused MoE: the MTP layer is this
    # project's layer (its attention, the fused MoE, a plain residual), not Megatron's default one
    ("mhc_moe_mtp", ["layer_specs.pretrain", "mhc_block_spec"], "mhc:\n  num_streams: 2\nmoe:\n  impl: fused\n",
     ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2", "--mtp-num-layers", "1"], "env"),
]
ROUTER_STATE = {"moe_expert_bias": "router_expert_bias", "moe_quantile_balancing": "router_qb_beta"}


def _checkpoint_dtypes(path):
    """{key: dtype} of the tensors in a torch distributed checkpoint's metadata (model weights,
    not the optimizer state)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: v.properties.dtype for k, v in meta.items()
            if hasattr(v, "properties") and not k.startswith("optimizer")}


def _checkpoint_tensors(path, suffix):
    """{key: tensor} of the checkpoint's model tensors whose key ends with ``suffix``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}_{suffix}.pt"
    dcp_to_torch_save(str(path), str(out))
    import torch

    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, torch.Tensor) and prefix.endswith(suffix) and not prefix.startswith("optimizer"):
            flat[prefix] = obj

    walk("", torch.load(out, weights_only=False))
    return flat


def _pretrain_log(log: str, train_iters: int = 10):
    iters = [int(m) for m in re.findall(rf"iteration\s+(\d+)/\s*{train_iters} \|", log)]
    losses = [float(m) for m in re.findall(r"lm loss: ([0-9.eE+-]+)", log)]
    return iters, losses


# the runs that are resumed from their iteration-10 checkpoint for two more steps
PRETRAIN_RESUMED = ("pretrain_mhc", "mhc_sparse_moe")


def _pretrain_runs(tmp_path, runs):
    """Launch ``runs`` = [(name, argv, knob text, channel, log file)] together on one GPU; wait;
    return {name: (rc, log text)}."""
    procs = {}
    for name, argv, knob_text, channel, log_name in runs:
        env = dict(subprocess_env(), CUDA_DEVICE_MAX_CONNECTIONS="1")
        env.pop("MEGATRON_EXT_CONFIG", None)
        argv = list(argv)
        if knob_text:
            knob_file = tmp_path / name / "knobs.yaml"
            knob_file.write_text(knob_text)
            if channel == "env":
                env["MEGATRON_EXT_CONFIG"] = str(knob_file)
            else:
                argv += ["--megatron-ext-config", str(knob_file)]
        log = open(tmp_path / name / log_name, "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "launch.pretrain_gpt", *argv]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log,
                       tmp_path / name / log_name)
    out = {}
    for name, (proc, log, path) in procs.items():
        rc = proc.wait(timeout=600)
        log.close()
        out[name] = (rc, path.read_text())
    return out


@pytest.mark.gpu
def test_megatron_pretrain_with_our_spec_and_knob_file(tmp_path):
    """Thirteen `-m launch.pretrain_gpt --spec ...` runs on one GPU, launched together (each is mostly
    start-up): 10 steps, finite falling loss, the layers the knobs ask for, a distributed checkpoint
    (the fused-MoE run with Megatron's distributed optimizer, whose default checkpoint format
    stores the optimizer state against the model's sharded tensors); the mHC run under Megatron's
    CUDA graphs gives the eager run's losses (also with sparse attention and the fused MoE), and three mHC + fused MoE runs under
    Megatron's --deterministic-mode (pinned mixer tilings, the MoE layer's deterministic mode; one replayed as CUDA graphs)
    give equal losses. Then two of them resume from that checkpoint for
    steps 11-12."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("megatron.training", reason="megatron.training ships with megatron-core >= 0.19")
    runs, argvs = [], {}
    for name, spec, knob_text, extra, channel in PRETRAIN_CASES:
        (tmp_path / name).mkdir()
        argvs[name] = ["--spec", *spec, *PRETRAIN, *extra, "--save", str(tmp_path / name / "ckpt")]
        runs.append((name, argvs[name], knob_text, channel, "run.log"))
    results = _pretrain_runs(tmp_path, runs)
    failures = []
    for name, (rc, text) in results.items():
        if rc != 0:
            failures.append(f"{name}: rc={rc}\n{text[-4000:]}")
            continue
        iters, losses = _pretrain_log(text)
        assert iters == list(range(1, 11)), (name, iters, text[-2000:])
        assert len(losses) == 10 and all(math.isfinite(x) for x in losses), (name, losses)
        assert losses[-1] < losses[0], (name, losses)  # mock data is arange sequences: quickly learnable
        ckpt = tmp_path / name / "ckpt"
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10", name
        assert (ckpt / "iter_0000010").is_dir(), name
    assert not failures, "\n\n".join(failures)
    layers = {name: text for name, (_, text) in results.items()}
    assert "MHCTransformerLayer" in layers["pretrain_mhc"] and "MHCFinalNorm" in layers["pretrain_mhc"]
    for module in ("MHCTransformerLayer", "SparseMQAttention", "FusedMoELayer"):
        assert module in layers["mhc_sparse_moe"], module
    # Megatron's --moe-layer-freq ([0]+[1]*1): layer 1 keeps the dense MLP, layer 2 is the fused MoE
    mlps = re.findall(r"mlp=(\w+)\)", layers["mhc_sparse_moe"])  # launch.pretrain_gpt.describe_layers
    assert mlps == ["MLP", "FusedMoELayer"], mlps
    assert "MHCTransformerLayer" not in layers["gpt_dense"] and "SDPACoreAttention" in layers["gpt_dense"]
    assert "MTP depth 1: TransformerLayer(attention=SelfAttention/SDPACoreAttention, mlp=FusedMoELayer)" in \
        layers["mhc_moe_mtp"], layers["mhc_moe_mtp"][-3000:]
    assert re.search(r"mtp_1 loss: [0-9.eE+-]+", layers["mhc_moe_mtp"]), layers["mhc_moe_mtp"][-2000:]
    # Megatron's local CUDA graphs (--cuda-graph-impl local) capture both mHC layers (forward and
    # backward graphs) after their warm-up steps and replay the same kernels: the eager run's losses
    for eager_run, graphed_run in (("pretrain_mhc", "mhc_cuda_graphs"), ("mhc_sparse_moe", "mhc_sparse_moe_cuda_graphs")):
        assert "built 4 cuda graph(s)" in layers[graphed_run], layers[graphed_run][-3000:]
        eager, graphed = (_pretrain_log(layers[n])[1] for n in (eager_run, graphed_run))
        assert max(abs(a - b) / abs(a) for a, b in zip(eager, graphed)) < 1e-3, (graphed_run, eager, graphed)
    # the fused MoE layer adds its experts' weight gradients into DDP's main_grad inside its
    # backward kernel and marks them added, which Megatron's graphs capture and replay (two
    # micro-batches a step): the graphed run's experts train as the eager run's (experts that
    # missed their gradients would sit about half their norm away after ten Adam steps of lr 1e-3
    # from a 0.02-std init; a doubled gradient would move the clipped grad norm and every weight)
    experts = []
    for name in ("mhc_sparse_moe", "mhc_sparse_moe_cuda_graphs"):
        found = _checkpoint_tensors(tmp_path / name / "ckpt" / "iter_0000010", "mlp.w1")
        assert len(found) == 1, (name, sorted(found))
        experts.append(next(iter(found.values())).float()[-1])   # the MoE layer (layer 2)
    drift = ((experts[1] - experts[0]).norm() / experts[0].norm()).item()
    print(f"fused MoE experts, eager vs Megatron's CUDA graphs after 10 steps: relative drift {drift:.2e}")
    assert drift < 1e-2, drift   # measured 0 (H100): the replay repeats the eager run bit for bit
    assert "built 4 cuda graph(s)" in layers["mhc_deterministic_cuda_graphs"]
    assert all("FusedMoELayer" in layers[n] for n in ("mhc_deterministic", "mhc_deterministic_cuda_graphs"))
    det = [_pretrain_log(layers[n])[1]  # the printed losses (one fixed format): equal digits
           for n in ("mhc_deterministic", "mhc_deterministic_again", "mhc_deterministic_cuda_graphs")]
    assert len(det[0]) == 10 and det[0] == det[1] == det[2], det
    for name in ("pretrain_mhc", "mhc_sparse_moe"):  # mhc.fp32_params: fp32 mixers beside bf16 weights
        dtypes = _checkpoint_dtypes(tmp_path / name / "ckpt" / "iter_0000010")
        mixers = {k: v for k, v in dtypes.items() if "mixer.phi" in k}
        qkv = {k: v for k, v in dtypes.items() if k.endswith("linear_qkv.weight")}
        assert mixers and set(mixers.values()) == {torch.float32}, (name, mixers)
        assert qkv and set(qkv.values()) == {torch.bfloat16}, (name, qkv)

    for name, buffer in ROUTER_STATE.items():   # moved every step (10 steps), kept fp32
        state = _checkpoint_tensors(tmp_path / name / "ckpt" / "iter_0000010", buffer)
        # Megatron saves the layers' buffers stacked: [layers, experts], both layers MoE
        assert [tuple(v.shape) for v in state.values()] == [(2, 4)], (name, state)
        value = next(iter(state.values()))
        assert value.dtype == torch.float32 and (value.abs().amax(dim=1) > 0).all(), (name, value)
        if buffer == "router_expert_bias":   # ten sign steps of 0.01 each
            ticks = value.double() / 0.01
            assert torch.allclose(ticks, ticks.round(), atol=1e-3) and ticks.abs().max() <= 10, value
        else:   # re-centred every step
            assert value.sum(dim=1).abs().max() < 1e-5, value

    # the latent projections in the checkpoint, one [hidden, latent] / [latent, hidden] per layer
    latent = _checkpoint_tensors(tmp_path / "moe_latent_probs_on_input" / "ckpt" / "iter_0000010", "latent_w1")
    assert sorted(tuple(v.shape) for v in latent.values()) in ([(2, 256, 128)], [(256, 128), (256, 128)]), latent

    resumed = []
    for name, _, knob_text, _, channel in PRETRAIN_CASES:
        if name in PRETRAIN_RESUMED:
            argv = [a if a != "10" or argvs[name][i - 1] != "--train-iters" else "12"
                    for i, a in enumerate(argvs[name])]
            # more --train-iters than the checkpoint's schedule: Megatron refuses a changed schedule
            # unless told to keep the checkpoint's (as a user extending a run does)
            resumed.append((name, argv + ["--load", str(tmp_path / name / "ckpt"),
                                          "--use-checkpoint-opt_param-scheduler"], knob_text, channel,
                            "resume.log"))
    for name, (rc, text) in _pretrain_runs(tmp_path, resumed).items():
        assert rc == 0, f"{name} resume: rc={rc}\n{text[-4000:]}"
        assert "successfully loaded checkpoint" in text and "at iteration 10" in text, (name, text[-3000:])
        iters, losses = _pretrain_log(text, train_iters=12)
        assert iters == [11, 12], (name, iters, text[-2000:])
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, losses)
        first = _pretrain_log(results[name][1])[1]
        # the resumed model continues where it stopped (a fresh one would restart near step 1's loss)
        assert max(losses) < first[0], (name, losses, first)


# -- the spec modules read the knob file themselves (CPU, the 0.16 TransformerConfig) --------------

@pytest.fixture
def parallel_state():
    with cpu_model_parallel():
        yield


def _tconfig(**overrides):
    from megatron_ext import compat

    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                  use_cpu_initialization=True, transformer_impl="local")
    return compat.make_transformer_config(**{**fields, **overrides})


def test_mhc_block_spec_reads_the_knob_file(tmp_path, monkeypatch, parallel_state):
    from layer_specs import knobs
    from layer_specs.mhc import mhc_block_spec
    from megatron_ext.config import ConfigError, MHCConfig
    from megatron_ext.modules.sparse_mqa import SparseMQAttention

    path = tmp_path / "k.yaml"
    path.write_text("mhc:\n  num_streams: 2\nsparse_attention:\n  pattern: WD\n  window_size: 8\n")
    monkeypatch.setenv(knobs.ENV, str(path))
    config = _tconfig()
    wrapped = types.SimpleNamespace(transformer=config)  # 0.19's GPTModelConfig passes this shape
    block = mhc_block_spec(wrapped)
    assert config.mhc == MHCConfig(num_streams=2) and config.mhc_num_streams == 2
    assert [spec.params["mhc"].num_streams for spec in block.layer_specs] == [2, 2]
    assert all(spec.submodules.self_attention.module is SparseMQAttention for spec in block.layer_specs)
    # a config that carries its own mHC knobs (the `megatron-ext train` path) keeps them
    own = _tconfig()
    own.mhc = MHCConfig(num_streams=4)
    assert mhc_block_spec(own).layer_specs[0].params["mhc"].num_streams == 4
    # file knobs get train's checks when the spec is built
    with pytest.raises(ConfigError, match=r"attention_dropout=0.1: the sparse attention op has no dropout"):
        mhc_block_spec(_tconfig(attention_dropout=0.1))
    path.write_text("sparse_attention:\n  pattern: W\n")
    with pytest.raises(ConfigError, match=r"window_size=None: .* has windowed \(W\) layers"):
        mhc_block_spec(_tconfig())


def test_pretrain_driver_helpers_without_megatron_training():
    from launch import pretrain_gpt
    from megatron_ext import compat

    defaults = pretrain_gpt.no_te_defaults()
    if not compat.HAVE_TE:
        assert defaults["transformer_impl"] == "local" and defaults["apply_rope_fusion"] is False
    if not compat.HAVE_TE and not compat.HAVE_APEX:
        assert defaults["gradient_accumulation_fusion"] is False

    class MHCTransformerLayer:
        def __init__(self, mlp):
            self.self_attention = types.SimpleNamespace(core_attention=None)
            self.mlp = mlp

    layers = [MHCTransformerLayer(types.SimpleNamespace()) for _ in range(2)] + [MHCTransformerLayer(None)]
    chunk = types.SimpleNamespace(decoder=types.SimpleNamespace(layers=layers, final_layernorm=object()))
    assert pretrain_gpt.describe_layers([chunk, types.SimpleNamespace()]) == (
        "megatron-ext: model chunk 0: 2 x MHCTransformerLayer(attention=SimpleNamespace/-, "
        "mlp=SimpleNamespace), 1 x MHCTransformerLayer(attention=SimpleNamespace/-, mlp=-); final norm object")
    if not compat.has_megatron_training():
        with pytest.raises(SystemExit, match=r"has no megatron.training; use megatron-core>=0.19"):
            pretrain_gpt.main([])


def test_prebuilt_dataset_helpers_patch_skips_make_when_the_extension_imports(monkeypatch):
    import megatron.core.datasets.utils as du

    import patches

    patch = patches.registered()["prebuilt_dataset_helpers"]
    assert patch.min_version == "0.19.0" and patch.lane == "any"
    monkeypatch.setattr(du, "compile_helpers", du.compile_helpers)  # restored after the test
    patch.fn()

    def no_make(*args, **kwargs):
        raise AssertionError(f"make must not run when helpers_cpp imports: {args}")

    monkeypatch.setattr("subprocess.run", no_make)
    du.compile_helpers()  # the installed wheel ships helpers_cpp: nothing to build


def test_kill_hook_is_inert_unless_asked(monkeypatch):
    from megatron_ext.training import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.kill_point() is None
    faults.maybe_kill(0, 1)  # unset: returns
    monkeypatch.setenv(faults.ENV, "1@7")
    assert faults.kill_point() == (1, 7)
    faults.maybe_kill(0, 7)  # another rank: returns
    faults.maybe_kill(1, 6)  # another iteration: returns
    monkeypatch.setenv(faults.ENV, "rank1")
    with pytest.raises(ValueError, match=r"MEGATRON_EXT_TEST_KILL_RANK='rank1': not RANK@ITER; use e.g. '1@7'"):
        faults.kill_point()


def test_hang_watchdog_dumps_stacks_of_a_slow_step_only(tmp_path):
    import time

    from megatron_ext.training import faults

    log = tmp_path / "stacks.txt"
    with open(log, "w+") as f:
        dog = faults.StepWatchdog(0.2, rank=3, stream=f)
        dog.arm(1)
        dog.disarm()  # a fast step: nothing dumped
        f.flush()
        assert "Thread" not in log.read_text() and "hang watchdog from iteration 1" in log.read_text()

        def slow_step():
            time.sleep(0.7)

        dog.arm(2)
        slow_step()
        dog.disarm()
        f.flush()
        text = log.read_text()
    assert "slow_step" in text and "test_hang_watchdog_dumps_stacks_of_a_slow_step_only" in text
    assert faults.StepWatchdog(None).arm(1) is None  # off by default: no faulthandler timer


def test_hang_dump_seconds_must_be_positive():
    from megatron_ext.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match=r"hang_dump_seconds=0: must be positive"):
        validate(TrainConfig(hang_dump_seconds=0), world_size=1)
