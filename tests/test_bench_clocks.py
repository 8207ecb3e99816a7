"""bench.clocks: the GPU's SM clock and power sampled while a case is timed, and where they show
(rows, table column, report header)."""

import itertools
import sys
import time

import pytest
import torch

from bench.cases import Benchmark, Case
from bench.clocks import ClockSampler, ClockStats, parse_smi_line, summarize_samples
from bench.report import format_header
from bench.table import CLOCK_HEADER, format_table, make_rows, to_json
from bench.timing import Timing

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("line, sample", [
    ("1365, 675.72", (1365.0, 675.72)),
    ("1980, [N/A]\n", (1980.0, None)),
    ("1410", (1410.0, None)),
    ("[N/A], 100.0", None),
    ("", None),
    ("No devices were found", None),
])
def test_parse_smi_line(line, sample):
    assert parse_smi_line(line) == sample


def test_summarize_samples_means_and_min():
    stats = summarize_samples([(1500.0, 600.0), (1700.0, None), (1620.0, 700.0)])
    assert stats == ClockStats(sm_mhz=pytest.approx(1606.6666667), sm_mhz_min=1500.0,
                               power_w=pytest.approx(650.0), samples=3)
    assert summarize_samples([(1980.0, None)]).power_w is None
    assert summarize_samples([]) is None


def _wait_for(sampler, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = sampler.stats()
        if stats is not None and stats.samples >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} samples after {timeout} s: {sampler.stats()}")


def test_polled_sampler_collects_between_start_and_stop_and_skips_failed_reads():
    values = itertools.cycle([(1400.0, 690.0), None, (1600.0, 710.0), RuntimeError("busy")])

    def query():
        v = next(values)
        if isinstance(v, Exception):
            raise v
        return v

    sampler = ClockSampler(query=query, interval_ms=2)
    sampler.start()
    _wait_for(sampler, 4)
    stats = sampler.stop()
    assert 1400.0 <= stats.sm_mhz <= 1600.0 and stats.sm_mhz_min == 1400.0
    assert 690.0 <= stats.power_w <= 710.0
    n = stats.samples
    time.sleep(0.05)
    assert sampler.stats().samples == n  # stopped: nothing more is collected
    sampler.start()  # a new window starts empty
    assert sampler.stats() is None or sampler.stats().samples < n
    sampler.stop()


def test_process_sampler_reads_lines_and_stops_the_process():
    script = ("import time\n"
              "for v in ('1400, 650.5', 'garbage', '1600, [N/A]'):\n"
              "    print(v, flush=True)\n"
              "time.sleep(60)\n")
    sampler = ClockSampler(command=[sys.executable, "-c", script])
    sampler.start()
    _wait_for(sampler, 2)
    proc = sampler._proc
    t0 = time.monotonic()
    stats = sampler.stop()
    assert time.monotonic() - t0 < 10 and proc.poll() is not None  # terminated, not waited out
    assert stats == ClockStats(sm_mhz=1500.0, sm_mhz_min=1400.0, power_w=650.5, samples=2)


def test_sampler_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of query="):
        ClockSampler()
    with pytest.raises(ValueError, match="exactly one of query="):
        ClockSampler(query=lambda: None, command=["true"])


def _bench():
    setup = lambda: (lambda: None)  # noqa: E731
    return Benchmark(name="b", description="d", shape="x[4]", cases=[
        Case("anchor", "anchor: a", "anchor", setup, flops=1e9),
        Case("ours", "ours: b", "ours", setup, flops=1e9)])


def _timing(ms):
    return Timing(median_ms=ms, p20_ms=ms, p80_ms=ms, min_ms=ms, reps=10)


def test_rows_carry_the_clock_and_the_table_shows_it_only_when_sampled():
    bench = _bench()
    clocks = [ClockStats(1512.4, 1365.0, 688.6, 40), ClockStats(1980.0, 1980.0, None, 3)]
    rows = make_rows(bench, [_timing(2.0), _timing(1.0)], None, clocks=clocks)
    assert [(r.sm_mhz, r.power_w) for r in rows] == [(1512.4, 688.6), (1980.0, None)]
    table = format_table(rows).splitlines()
    assert table[0].endswith(f"| {CLOCK_HEADER} |") and table[1].count("---:") == 7
    assert table[2].endswith("| 1512 (689 W) |") and table[3].endswith("| 1980 |")
    assert '"sm_mhz": 1512.4' in to_json(rows)

    plain = make_rows(bench, [_timing(2.0), _timing(1.0)], None)
    assert CLOCK_HEADER not in format_table(plain) and plain[0].sm_mhz is None
    with pytest.raises(ValueError, match=r"clocks=1: need one per case of 'b' \(2\)"):
        make_rows(bench, [_timing(2.0), _timing(1.0)], None, clocks=clocks[:1])


def test_header_names_the_clock_limits_and_source():
    meta = {"device": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "capability": "sm_90", "mode": "cuda",
            "versions": {"python": "3.12", "torch": "2.11"}, "date": "today",
            "ceilings_text": "measured", "clock_source": "nvidia-smi, every 50 ms",
            "max_sm_mhz": 1980.0, "power_limit_w": 700.0}
    header = format_header(meta)
    assert ("- GPU clock: max SM clock 1980 MHz, power limit 700 W; SM MHz (W) = mean SM clock "
            "(board power) over each case's timed calls (nvidia-smi, every 50 ms)") in header
    del meta["max_sm_mhz"], meta["power_limit_w"]
    assert "- GPU clock: limits unknown;" in format_header(meta)
    del meta["clock_source"]
    assert "GPU clock" not in format_header(meta)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_the_gpu_is_sampled_while_a_case_is_timed():
    from bench.clocks import device_limits, sampler_for_device
    from bench.timing import time_cuda

    sampler, source = sampler_for_device()
    assert sampler is not None, source
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    time_cuda(lambda: a @ a, warmup_ms=20, rep_ms=300, clocks=sampler)
    stats = sampler.stats()
    limits = device_limits()
    assert stats is not None and stats.samples >= 2, (source, stats)
    assert limits is not None and 100 < stats.sm_mhz_min <= stats.sm_mhz <= limits[0] + 1, (stats, limits)

    def fails_once_sampled():  # a case that fails during its timed calls stops the sampler too
        if sampler._thread is not None:
            raise RuntimeError("case failed")
        return a @ a

    with pytest.raises(RuntimeError, match="case failed"):
        time_cuda(fails_once_sampled, warmup_ms=5, rep_ms=20, clocks=sampler)
    assert sampler._thread is None and sampler._proc is None
