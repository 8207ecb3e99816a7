"""Benchmark harness (bench/): table math, percentiles, registry, CLI errors, CPU smoke run."""

import os

os.environ["TORCH_COMPILE_DISABLE"] = "1"

import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import cli, harness, registry  # noqa: E402
from bench.cases import Benchmark, Case  # noqa: E402
from bench.devices import Ceilings, datasheet_ceilings, profile_for  # noqa: E402
from bench.flops import layer_fwd_bwd_flops, layer_fwd_flops  # noqa: E402
from bench.table import format_row, format_table, make_rows, to_json  # noqa: E402
from bench.timing import Timing, percentile, summarize, time_cpu  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _noop_setup():
    return lambda: None


def _bench(cases):
    return Benchmark(name="b", description="d", shape="x[4]", cases=cases)


def _timing(ms, p20=None, p80=None):
    return Timing(median_ms=ms, p20_ms=ms - 0.5 if p20 is None else p20,
                  p80_ms=ms + 0.5 if p80 is None else p80, min_ms=ms - 1, reps=10)


# ---------------------------------------------------------------------------------------------
# statistics


def test_percentile_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 20) == pytest.approx(1.8)  # position 0.8 between 1 and 2
    assert percentile(xs, 80) == pytest.approx(4.2)  # position 3.2 between 4 and 5
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([7.0], 20) == 7.0


def test_percentile_errors():
    with pytest.raises(ValueError, match=r"values=\[\]"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"q=101"):
        percentile([1.0], 101)


def test_summarize():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.min_ms, t.reps) == (3.0, 1.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)


def test_time_cpu_counts_calls():
    calls = []
    t = time_cpu(lambda: calls.append(1), warmup_ms=0.0, rep_ms=0.0, min_reps=4)
    assert t.reps == 4 and t.median_ms >= 0 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(calls) == 1 + 1 + 4  # first call, one warm-up, four timed


# ---------------------------------------------------------------------------------------------
# table math


CEIL = Ceilings(device="test", source="measured", matmul_tflops=1000.0, copy_gbs=3000.0, detail="t")


def test_rows_ratio_and_roofline_exact():
    b = _bench([
        Case("ours", "ours: fast", "ours", _noop_setup, flops=2e12, bound="compute"),
        Case("anchor", "anchor: slow", "anchor", _noop_setup, flops=2e12, bound="compute"),
        Case("ref", "ref: copy", "ref", _noop_setup, bytes=3e9, bound="memory"),
    ])
    ours, anchor, ref = make_rows(b, [_timing(4.0), _timing(10.0), _timing(2.0)], CEIL)

    assert ours.tflops == pytest.approx(500.0)  # 2e12 FLOP / 4 ms
    assert ours.ratio == pytest.approx(2.5)  # 10 ms / 4 ms: ours faster
    assert ours.roofline_pct == pytest.approx(50.0)  # 500 / 1000 TFLOP/s
    assert ours.gbs is None

    assert anchor.tflops == pytest.approx(200.0)
    assert anchor.ratio == pytest.approx(1.0)
    assert anchor.roofline_pct == pytest.approx(20.0)

    assert ref.gbs == pytest.approx(1500.0)  # 3e9 B / 2 ms
    assert ref.tflops is None
    assert ref.ratio == pytest.approx(5.0)
    assert ref.roofline_pct == pytest.approx(50.0)  # 1500 / 3000 GB/s

    assert format_row(ours) == ["b", "ours: fast", "4.000", "3.500–4.500", "500.0", "", "2.50",
                                "50.0 (compute)"]
    assert format_row(ref) == ["b", "ref: copy", "2.000", "1.500–2.500", "", "1500", "5.00",
                               "50.0 (memory)"]


def test_rows_without_anchor_or_ceilings_leave_blanks():
    b = _bench([Case("mm", "ref: matmul", "ref", _noop_setup, flops=1e9)])
    (row,) = make_rows(b, [_timing(0.5, 0.25, 0.75)], None)
    assert row.ratio is None and row.roofline_pct is None
    assert row.tflops == pytest.approx(2.0)
    assert format_row(row) == ["b", "ref: matmul", "0.500", "0.250–0.750", "2.0", "", "", ""]
    none = Ceilings("x", "none", None, None, "no profile")
    assert make_rows(b, [_timing(0.5)], none)[0].roofline_pct is None


def test_first_anchor_is_the_baseline():
    b = _bench([
        Case("a1", "anchor: one", "anchor", _noop_setup),
        Case("a2", "anchor: two", "anchor", _noop_setup),
        Case("o", "ours: x", "ours", _noop_setup),
    ])
    rows = make_rows(b, [_timing(6.0), _timing(3.0), _timing(2.0)], CEIL)
    assert [r.ratio for r in rows] == pytest.approx([1.0, 2.0, 3.0])


def test_format_table_and_json():
    b = _bench([Case("ours", "ours: x", "ours", _noop_setup, flops=2e12),
                Case("anchor", "anchor: y", "anchor", _noop_setup, flops=2e12)])
    rows = make_rows(b, [_timing(4.0), _timing(10.0)], CEIL)
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| benchmark | case | ms (median) |")
    assert "anchor ms / ms; >1 = faster than anchor" in lines[0]
    assert lines[0].endswith("| % roofline |")
    assert lines[2] == "| b | ours: x | 4.000 | 3.500–4.500 | 500.0 |  | 2.50 | 50.0 (compute) |"
    assert lines[3] == "| b | anchor: y | 10.000 | 9.500–10.500 | 200.0 |  | 1.00 | 20.0 (compute) |"
    data = json.loads(to_json(rows, {"device": "test"}))
    assert data["meta"] == {"device": "test"}
    assert [r["role"] for r in data["rows"]] == ["ours", "anchor"]
    assert data["rows"][0]["ratio"] == pytest.approx(2.5)


def test_make_rows_needs_one_timing_per_case():
    b = _bench([Case("o", "ours: x", "ours", _noop_setup)])
    with pytest.raises(ValueError, match="timings=2"):
        make_rows(b, [_timing(1.0), _timing(1.0)], CEIL)


def test_case_and_benchmark_validation():
    with pytest.raises(ValueError, match=r"role='mine'.*'ours', 'anchor', 'ref'"):
        Case("x", "x", "mine", _noop_setup)
    with pytest.raises(ValueError, match=r"bound='io'"):
        Case("x", "x", "ours", _noop_setup, bound="io")
    with pytest.raises(ValueError, match=r"flops=0"):
        Case("x", "x", "ours", _noop_setup, flops=0)
    with pytest.raises(ValueError, match=r"duplicated"):
        _bench([Case("x", "x", "ours", _noop_setup), Case("x", "y", "anchor", _noop_setup)])


def test_layer_flops_exact():
    s, b, h, heads, ffn = 4096, 2, 2048, 16, 8192
    fwd = 2 * s * b * h * (3 * h + h + 2 * ffn) + 2 * b * s * s * h  # causal-halved QK^T + PV
    assert layer_fwd_flops(s, b, h, heads, ffn) == fwd == 962072674304
    assert layer_fwd_bwd_flops(s, b, h, heads, ffn) == 3 * fwd
    # GQA (4 kv heads) shrinks only linear_qkv; non-causal doubles the attention core.
    assert layer_fwd_flops(s, b, h, heads, ffn, kv_heads=4) == fwd - 2 * s * b * h * (2 * h - 2 * 512)
    assert layer_fwd_flops(s, b, h, heads, ffn, causal=False) == fwd + 2 * b * s * s * h


# ---------------------------------------------------------------------------------------------
# device profiles


@pytest.mark.parametrize("name, profile, tflops, gbs", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0, 3350.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0, 2000.0),
    ("NVIDIA H200", "H200 SXM", 989.0, 4800.0),
    ("NVIDIA B200", "B200", 2250.0, 8000.0),
])
def test_datasheet_profiles(name, profile, tflops, gbs):
    p = profile_for(name)
    assert (p.name, p.bf16_tflops, p.hbm_gbs) == (profile, tflops, gbs)
    c = datasheet_ceilings(name)
    assert (c.source, c.matmul_tflops, c.copy_gbs) == ("datasheet", tflops, gbs)


def test_unknown_device_has_no_ceilings():
    c = datasheet_ceilings("NVIDIA GeForce RTX 4090")
    assert c.source == "none" and c.matmul_tflops is None
    assert "blank" in c.describe()


# ---------------------------------------------------------------------------------------------
# registry and run()


@pytest.fixture
def toy_benchmark():
    @registry.register
    def toy_bench_for_tests(small=False, device="cuda"):
        n = 16 if small else 1024

        def setup():
            a = torch.randn(n, n, device=device)
            return lambda: a @ a

        return Benchmark("toy_bench_for_tests", "toy", f"a[{n}, {n}] fp32", [
            Case("ours", "ours: matmul", "ours", setup, flops=2.0 * n ** 3),
            Case("anchor", "anchor: matmul", "anchor", setup, flops=2.0 * n ** 3),
        ])

    yield "toy_bench_for_tests"
    registry._REGISTRY.pop("toy_bench_for_tests", None)


def test_registry_lists_builtins_and_registered(toy_benchmark):
    names = registry.available()
    assert {"calibration", "dense_layer", toy_benchmark} <= set(names)
    assert list(registry.select([toy_benchmark, "calibration", toy_benchmark])) == [
        toy_benchmark, "calibration"]
    assert list(registry.select([])) == list(names)


def test_every_benchmark_builds_its_gpu_cases_under_its_own_name():
    """Each registered benchmark, built for the GPU (construction only: no case is set up, so
    this runs on a CPU), keeps its registered name and distinct case names; the CPU smoke runs
    build only the CPU subset of the cases."""
    for name, builder in registry.select([]).items():
        bench = builder(small=False, device="cuda")
        names = [c.name for c in bench.cases]
        assert bench.name == name and names and len(names) == len(set(names)), (name, names)


def test_registry_unknown_name_error():
    with pytest.raises(ValueError, match=r"benchmark='nope': unknown; use one of .*'dense_layer'"):
        registry.select(["calibration", "nope"])


def test_registry_rejects_name_clash():
    def calibration(small=False, device="cuda"):
        raise AssertionError("not called")

    with pytest.raises(ValueError, match=r"benchmark='calibration': already registered"):
        registry.register(calibration)


@pytest.mark.parametrize("skip_anchor", [False, True])
def test_a_case_that_cannot_run_is_reported_and_the_rest_still_run(skip_anchor):
    """A setup raising CaseUnavailable: the run goes on; that row has no figures and says why; the
    ratio column is blank when the anchor itself was skipped."""
    from bench.cases import CaseUnavailable

    def unavailable():
        raise CaseUnavailable("CUDA graph capture failed: synchronising call")

    def setup():
        a = torch.randn(16, 16)
        return lambda: a @ a

    cases = [Case("anchor", "anchor: matmul", "anchor", unavailable if skip_anchor else setup, flops=8192.0),
             Case("ours", "ours: matmul", "ours", setup, flops=8192.0),
             Case("graph", "ours: matmul, one CUDA graph", "ours", unavailable, flops=8192.0)]

    @registry.register
    def skip_bench_for_tests(small=False, device="cuda"):
        return Benchmark("skip_bench_for_tests", "toy", "a[16, 16]", cases)

    try:
        lines = []
        rows = harness.run(["skip_bench_for_tests"], cpu=True, ceilings=CEIL, progress=lines.append)
    finally:
        registry._REGISTRY.pop("skip_bench_for_tests", None)
    by = {r.case: r for r in rows}
    assert [r.case for r in rows] == ["anchor", "ours", "graph"]
    assert by["graph"].ms is None and by["graph"].tflops is None and by["graph"].ratio is None
    assert by["graph"].label == "ours: matmul, one CUDA graph (skipped: CUDA graph capture failed: synchronising call)"
    assert by["ours"].ms > 0 and by["ours"].tflops > 0
    assert (by["ours"].ratio is None) == skip_anchor
    assert any("skipped: CUDA graph capture failed" in line for line in lines)
    table = format_table(rows)
    assert "(skipped: CUDA graph capture failed: synchronising call) |  |  |  |  |  |  |" in table
    json.loads(to_json(rows))


def test_run_cpu_in_process(toy_benchmark):
    rows = harness.run([toy_benchmark], cpu=True, ceilings=CEIL, progress=None)
    assert [r.role for r in rows] == ["ours", "anchor"]
    assert all(r.ms > 0 and r.tflops > 0 for r in rows)
    assert rows[1].ratio == pytest.approx(1.0)
    assert rows[0].ratio == pytest.approx(rows[1].ms / rows[0].ms)


def test_cli_unknown_name(capsys):
    assert cli.main(["dense_layer", "nope"]) == 2
    err = capsys.readouterr().err
    assert "benchmark='nope': unknown" in err and "'calibration'" in err and "'dense_layer'" in err


def test_cli_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "dense_layer:" in out and "s=4096" in out and "calibration:" in out


@pytest.mark.skipif(not NO_CUDA, reason="checks the no-CUDA error; this machine has CUDA")
def test_cli_without_cuda_needs_cpu_flag(capsys):
    assert cli.main(["calibration"]) == 1
    assert "--cpu" in capsys.readouterr().err


def test_cpu_smoke_dense_layer_end_to_end(tmp_path):
    """``python -m bench dense_layer --cpu`` in a fresh process (the CPU lane patches torch.cuda)."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "bench", "dense_layer", "--cpu",
         "--json", str(out_json), "--markdown", str(out_md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = json.loads(out_json.read_text())["rows"]
    by_role = {r["role"]: r for r in rows}
    assert set(by_role) == {"ours", "anchor"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert by_role["anchor"]["ratio"] == pytest.approx(1.0)
    assert by_role["ours"]["ratio"] == pytest.approx(by_role["anchor"]["ms"] / by_role["ours"]["ms"])

    md = out_md.read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| dense_layer |")]
    assert len(table) == 2
    assert "ours: sdpa dense layer" in table[0] and "anchor: megatron DotProductAttention" in table[1]
    assert float(table[0].split("|")[3]) > 0 and float(table[1].split("|")[3]) > 0
    assert "ceilings used for % roofline: measured" in md and "megatron-core" in md
    assert proc.stdout.strip() == md.strip()


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_time_cuda_matmul():
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    t = harness.time_cuda(lambda: a @ a, warmup_ms=5, rep_ms=20)
    assert t.reps >= 10 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_calibrate_on_gpu():
    c = harness.calibrate(cpu=False)
    assert c.source == "measured" and c.matmul_tflops > 1 and c.copy_gbs > 10


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_cuda_graph_replays_the_step_and_refuses_a_synchronising_one():
    from bench.cases import CaseUnavailable, cuda_graph

    a = torch.randn(256, 256, device="cuda")
    out = torch.empty_like(a)

    def step():
        torch.matmul(a, a, out=out)

    replay = cuda_graph(step)
    a.copy_(torch.randn_like(a))
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, a @ a)
    stream = torch.cuda.current_stream()
    with pytest.raises(CaseUnavailable, match="CUDA graph capture failed"):
        cuda_graph(lambda: (a.sum() > 0).item())
    # the refused capture leaves the process usable: the stream it ran on and the GPU's random
    # numbers (a failed capture used to leave the default generator in capture mode)
    assert torch.cuda.current_stream() == stream
    torch.manual_seed(0)
    r1 = torch.randn(1000, device="cuda")
    torch.manual_seed(0)
    assert torch.equal(r1, torch.randn(1000, device="cuda")) and r1.std() > 0.5
    # and a later capture of a random op replays fresh numbers
    noise = torch.empty(1000, device="cuda")
    replay = cuda_graph(lambda: noise.normal_())
    replay()
    first = noise.clone()
    replay()
    assert not torch.equal(first, noise)
