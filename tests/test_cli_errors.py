"""Bad input: one clear line naming field, value and what is allowed; exit 2; nothing written."""

import subprocess
import sys

import pytest

from megatron_ext.cli import main
from tests.helpers import ROOT

CASES = [
    (["--preset", "huge"], "preset='huge'", "one of ['small', 'test', 'tiny']"),
    (["--train-iters", "-5"], "train_iters=-5", "an integer >= 1"),
    (["--global-batch-size", "10"], "global_batch_size=10", "a multiple of 8"),
    (["--data-path", "/nonexistent/corpus.txt"], "data_path='/nonexistent/corpus.txt'", "file not found"),
    (["--tensor-model-parallel-size", "3"], "world_size=1", "a multiple of 3"),
    (["--hidden-size", "66"], "hidden_size=66", "num_attention_heads=4"),
    (["--sequence-parallel"], "sequence_parallel=True", "tensor_model_parallel_size > 1"),
    (["--use-torch-fsdp2", "--use-distributed-optimizer"], "use_distributed_optimizer=True",
     "one of --use-torch-fsdp2 and --use-distributed-optimizer"),
    (["--expert-model-parallel-size", "2"], "expert_model_parallel_size=2", "--num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "moe_router_topk=5", "1 <= k <= num_experts"),
    (["--normalization", "BatchNorm"], "normalization='BatchNorm'", "'LayerNorm', 'RMSNorm'"),
    (["--lr", "0"], "lr=0.0", "a learning rate > 0"),
    (["--preset", "test", "--train-iters", "2"], "lr_warmup_iters=2", "--lr-warmup-iters below 2"),
    (["--nproc-per-node", "zero"], "nproc_per_node='zero'", "'auto' or an integer >= 1"),
    (["--mtp-num-layers", "0"], "mtp_num_layers=0", "an integer >= 1 (DeepSeek-V3 uses 1)"),
    (["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "-0.1"], "mtp_loss_scaling_factor=-0.1",
     "must be a finite number >= 0"),
]


@pytest.mark.parametrize("argv,field,allowed", CASES, ids=[c[1].split("=")[0] for c in CASES])
def test_bad_input_fails_at_config_time(tmp_path, capsys, argv, field, allowed):
    runs = tmp_path / "runs"
    rc = main(["train", "--runs-root", str(runs), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("megatron-ext: error: ")
    assert field in err[0] and allowed in err[0], err[0]
    assert not runs.exists(), "a rejected run must leave nothing behind"


def test_bf16_under_the_triton_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    """bf16 trains on the CPU lane (tests/test_train.py), but not with the kernels interpreted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    runs = tmp_path / "runs"
    rc = main(["train", "--runs-root", str(runs), "--device", "cpu", "--bf16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not runs.exists()
    assert err == ("megatron-ext: error: bf16=True: under TRITON_INTERPRET=1 the CPU lane runs the Triton "
                   "kernels in the interpreter, whose tl.dot is wrong on bf16 inputs; use --no-bf16, or unset "
                   "TRITON_INTERPRET")


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--preset", "test", "--runs-root", str(tmp_path / "runs"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "resume=True" in err and "run without --resume first" in err


def test_console_script_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_ext", "train", "--preset", "nope",
                           "--runs-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("megatron-ext: error: preset='nope': unknown preset; "
                                   "use one of ['small', 'test', 'tiny']")
