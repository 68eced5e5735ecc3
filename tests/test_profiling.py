"""Issue 17, items 1-3: see where the time goes.

- torch.profiler ranges `vzstream.<stage>:<fqn>`: the forward thread's (`wait`, `bind`, `release`)
  in a plain `profile()`, decode and upload on the workers' threads, on the CPU backend and on
  the fake GPU; `wait` covers exactly the time the forward thread blocks.
- The overlap report: exact arithmetic on given spans; on the fake backend with injected delays,
  `overlap` near 1 when the delays hide behind compute and near 0 when they do not, and the
  unit that stalls named with its cause; on the fake GPU the stall comes from timing events
  made once, read one pass late, never synchronised.
- The timeline: a PNG matplotlib wrote, with the lanes of the backend; the demo draws one; the
  spans it draws from stay in a bounded ring.
(The exact torch calls per unit with no profiler running: tests/test_calls.py.)
"""

import threading
import time

import pytest
import torch
from torch import nn

import vzstream
from vzstream import timing as timing_mod
from vzstream.backends import cuda as cuda_mod
from vzstream.backends.cuda import CudaBackend
from vzstream.backends.timer import COPIED, MERGED, START, DeviceTimer
from vzstream.timing import PassTimes, Timing, stall_spans
from fake_cuda import FakeCuda, FakeEvent
from models import build, save_tiny_llama

PNG = b"\x89PNG\r\n\x1a\n"


class PacedBlock(nn.Module):
    """One Linear (256 KiB in fp32: fetched by a worker, not inline) whose forward takes
    `compute_s` more, sleeping as a kernel would leave the GIL to the decode workers."""

    def __init__(self, dim: int, compute_s: float) -> None:
        super().__init__()
        self.lin, self.compute_s = nn.Linear(dim, dim), compute_s

    def forward(self, x):
        if self.compute_s:
            time.sleep(self.compute_s)
        return self.lin(x)


class Paced(nn.Module):
    def __init__(self, num_blocks: int = 6, dim: int = 256, compute_s: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PacedBlock(dim, compute_s) for _ in range(num_blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _paced(dtype=torch.float32, **kwargs):
    return build(Paced, dtype=dtype, **kwargs), torch.randn(2, 256).to(dtype)


def _run(backend, passes: int, model_kwargs=None, **options):
    """`passes` passes of a Paced model through a session on `backend`: its stats and timing."""
    model, x = _paced(**(model_kwargs or {}))
    with vzstream.session(model, backend=backend, **options) as s:
        for _ in range(passes):
            s(x)
        return s.stats(), s.member.runtime.timing


@pytest.fixture
def device_clock(monkeypatch):
    """FakeEvent.elapsed_time from the host times of the records (a CPU "copy" runs as issued)."""
    monkeypatch.setattr(FakeEvent, "elapsed_time", lambda self, other: (other.t - self.t) * 1e3)


# -- profiler ranges ------------------------------------------------------------------------------

def _ranges(prof) -> dict:
    """stage -> {thread ids} of the `vzstream.<stage>:...` ranges in `prof`."""
    out: dict = {}
    for e in prof.events():
        if e.name.startswith("vzstream."):
            out.setdefault(e.name.split(".", 1)[1].split(":")[0], set()).add(e.thread)
    return out


def _all_threads():
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        pytest.skip("this torch's profiler cannot record other threads")


@pytest.mark.parametrize("where", ["cpu", "fake_gpu"])
def test_ranges_appear_with_their_thread_ids(where, monkeypatch):
    """A plain profile() shows the forward thread's ranges; with every thread recorded, decode
    and upload appear on the workers' threads, never on the forward thread's."""
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)
    backend = CudaBackend("cpu", cuda=FakeCuda()) if where == "fake_gpu" else vzstream.CpuBackend()
    model, x = _paced(dtype=torch.bfloat16)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with vzstream.session(model, backend=backend, prefetch=1, codec="zstd") as s:
        s(x)
        s(x)
        with torch.profiler.profile(activities=cpu) as plain:
            s(x)
        with torch.profiler.profile(activities=cpu, experimental_config=_all_threads()) as every:
            s(x)
    seen = _ranges(plain)
    assert {"bind", "release"} <= set(seen) and not {"decode", "upload"} & set(seen), seen
    forward = seen["bind"] | seen["release"]
    assert len(forward) == 1
    seen = _ranges(every)
    assert seen["bind"] | seen["release"] == {next(iter(seen["bind"]))}
    workers = seen["decode"] | seen["upload"]
    assert workers and not workers & seen["bind"]
    names = {e.name for e in every.events()}
    assert {f"vzstream.{stage}:blocks.3" for stage in ("decode", "upload", "bind", "release")} <= names


@pytest.mark.parametrize("where", ["fake", "fake_gpu"])
def test_wait_covers_exactly_the_time_the_forward_thread_blocks(where, monkeypatch):
    """prefetch=0: each unit is requested at its bind, so the forward thread waits out its
    30 ms decode, inside `vzstream.wait:<fqn>`, on its own thread."""
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)
    delay = 0.03
    if where == "fake":
        backend = vzstream.FakeBackend(delays={("decode", "blocks.2"): delay})
    else:
        backend = CudaBackend("cpu", cuda=FakeCuda())
        stage_into = cuda_mod.stage_into

        def slow(buffer, offset, nbytes, frame, fqn=""):
            if fqn == "blocks.2":
                time.sleep(delay)
            stage_into(buffer, offset, nbytes, frame, fqn)
        monkeypatch.setattr(cuda_mod, "stage_into", slow)
    model, x = _paced(dtype=torch.bfloat16)
    with vzstream.session(model, backend=backend, prefetch=0, codec="zstd") as s:
        s(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            s(x)
    waits = [e for e in prof.events() if e.name == "vzstream.wait:blocks.2"]
    binds = {e.thread for e in prof.events() if e.name.startswith("vzstream.bind")}
    assert len(waits) == 1 and {waits[0].thread} == binds
    assert 0.8 * delay * 1e6 <= waits[0].cpu_time_total <= delay * 1e6 + 20e3     # us


# -- the overlap report ---------------------------------------------------------------------------

def test_a_pass_sums_its_spans_exactly():
    """Decode 0-4 s on one worker and 1-2 s on another, upload 4-5 s, compute waiting 3-5 s:
    5 s of decode or upload, 2 s of it with compute waiting, so 3 s hidden."""
    t = Timing()
    spans = [("decode", "w0", "u", 0.0, 4.0), ("decode", "w1", "v", 1.0, 2.0), ("upload", "upload", "u", 4.0, 5.0),
             ("compute", "compute", "v", 2.0, 3.0), *stall_spans("u", 3.0, 5.0, decoded_at=4.0, uploaded_at=5.0)]
    for span in spans:
        t.span(*span)
    t.close(t.end_pass(0.0, 10.0))
    assert t.total == PassTimes(passes=1, wall_s=10.0, decode_s=5.0, upload_s=1.0, stall_s=2.0, stall_decode_s=1.0,
                                busy_s=5.0, hidden_s=3.0)
    assert t.total.overlap == pytest.approx(0.6) and t.total.compute_s == 8.0
    assert t.worst_units() == [("u", 2.0, "decode")]     # 1 s each: a tie goes to decode
    assert stall_spans("u", 3.0, 5.0, 0.0, 4.0) == [("stall", "upload", "u", 3.0, 5.0)]   # nothing to decode
    assert stall_spans("u", 3.0, 5.0, 9.0, 9.5) == [("stall", "decode", "u", 3.0, 5.0)]
    assert stall_spans("u", 3.0, 5.0, 3.5, 4.0) == [("stall", "decode", "u", 3.0, 3.5), ("stall", "upload", "u", 3.5, 4.0),
                                                    ("stall", "decode", "u", 4.0, 5.0)]   # then waking up


def test_late_device_spans_close_the_pass_before():
    t = Timing()
    assert t.end_pass(0.0, 1.0, late=True) is None          # pass 0 waits for its device spans
    ended = t.end_pass(1.0, 2.0, late=True)
    assert ended[0] == 0
    t.close(ended, [("upload", "copy", "u", 0.2, 0.4), ("stall", "upload", "u", 0.3, 0.4)])
    assert t.total.passes == 1 and t.total.stall_s == pytest.approx(0.1) and t.total.overlap == pytest.approx(0.5)
    assert t.take_pending()[0] == 1 and t.take_pending() is None


def test_decode_hidden_behind_compute_gives_overlap_near_one():
    """5 ms of decode a unit under 20 ms of compute, two units ahead: nothing to wait for once
    the schedule runs (pass 0 traces; pass 1 starts before the prefetch its learning began)."""
    fake = vzstream.FakeBackend(delays={("decode", "*"): 0.005})
    stats, _ = _run(fake, 5, dict(compute_s=0.02), prefetch=2, workers=2)
    steady = stats.per_pass[2:]
    assert all(p.overlap > 0.9 for p in steady), steady
    assert sum(p.stall_s for p in steady) < 0.05 * sum(p.wall_s for p in steady)
    assert stats.advice.startswith("nothing to do"), stats.advice


def test_decode_not_hidden_gives_overlap_near_zero():
    """20 ms of decode a unit, nothing fetched ahead (prefetch=0): compute waits for every decode."""
    fake = vzstream.FakeBackend(delays={("decode", "*"): 0.02})
    stats, _ = _run(fake, 4, dict(compute_s=0.002), prefetch=0, workers=2)
    last = stats.per_pass[-1]
    assert last.overlap < 0.1 and last.stall_fraction > 0.4, last     # 6 x 20 ms of decode against 6 x 2 ms of compute
    assert stats.overlap < 0.1
    assert stats.advice.startswith("raise prefetch: ") and "prefetch=1" in stats.advice, stats.advice
    assert stats.stalled_most and all(cause == "decode" for _, _, cause in stats.stalled_most)


def test_the_unit_that_stalls_is_named_with_its_cause():
    """blocks.2 decodes for 60 ms and blocks.4 uploads for 60 ms, against 5 ms of compute a
    unit: they are the two units compute waited for most, each for its own reason."""
    fake = vzstream.FakeBackend(delays={("decode", "blocks.2"): 0.06, ("upload", "blocks.4"): 0.06})
    stats, _ = _run(fake, 4, dict(compute_s=0.005), prefetch=1, workers=2)
    worst = {fqn: cause for fqn, _, cause in stats.stalled_most[:2]}
    assert worst == {"blocks.2": "decode", "blocks.4": "upload"}, stats.stalled_most
    table = str(stats)
    assert "blocks.2" in table.splitlines()[-2] and table.splitlines()[-1].startswith("advice")


def test_device_stall_is_timed_by_events_and_named_on_the_fake_gpu(monkeypatch, device_clock):
    """Nibble codes on the fake GPU (nothing decodes on the host): blocks.3's copies take 50 ms,
    so the compute stream waits for its upload, as the timing events say."""
    copy_image = CudaBackend._copy_image

    def slow(self, ticket, fetch):
        if ticket.store.unit.fqn == "blocks.3":
            time.sleep(0.05)
        copy_image(self, ticket, fetch)
    monkeypatch.setattr(CudaBackend, "_copy_image", slow)
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)
    stats, timing = _run(CudaBackend("cpu", cuda=FakeCuda()), 4, dict(dtype=torch.bfloat16), prefetch=1,
                         codec="nibble")
    assert stats.stalled_most[0][0] == "blocks.3" and stats.stalled_most[0][2] == "upload", stats.stalled_most
    assert stats.per_pass[-1].stall_s > 0.03 and stats.upload_s > 0.1
    kinds = {kind for kind, *_ in timing.spans}
    assert {"copy", "expand", "upload", "compute", "stall"} <= kinds and "decode" not in kinds


def test_device_timer_reads_a_pass_late_with_no_sync_and_no_event_per_fetch(monkeypatch, device_clock):
    fake = FakeCuda()
    copy, merge = fake.Stream(), fake.Stream()
    timer = DeviceTimer(fake, "cpu", num_fetches=3, prefetch=2)
    made = []
    init = FakeEvent.__init__
    monkeypatch.setattr(FakeEvent, "__init__", lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    for number in range(4):
        timer.pass_started(number, time.perf_counter())
        for index in range(3):
            rec = timer.record(number, index, f"u{index}")
            timer.reach(rec)
            rec.mark(START, copy)
            if index == 1:
                time.sleep(0.01)                  # u1's copy ends after compute reached it
            rec.mark(COPIED, copy)
            rec.mark(MERGED, merge)
            timer.release(rec)
        if number == 0:
            assert timer.read(0) == []            # pass 1's anchor not recorded yet: not known
    spans = timer.read(2)
    assert {s[2] for s in spans} == {"u0", "u1", "u2"}
    stalls = [s for s in spans if s[0] == "stall" and s[4] - s[3] > 0.005]     # the others: microseconds
    assert [s[2] for s in stalls] == ["u1"] and stalls[0][4] - stalls[0][3] >= 0.009
    assert timer.read(3) == [] and timer.read(3, last=True)
    assert made == [] and not [op for op in fake.ops if "synchronize" in op[1]]
    rec = timer.record(4, 0, "u0")                # pass 4 reuses pass 0's records, cleared
    assert not any(rec.marked) and timer.read(0) == []


def test_stats_table_is_short_and_ends_with_advice():
    stats, _ = _run(vzstream.FakeBackend(), 3, prefetch=1)
    lines = str(stats).splitlines()
    assert len(lines) <= 14 and lines[-1].startswith("advice ") and lines[-2].startswith("stalled most")
    assert any(line.startswith("last pass") for line in lines) and any(line.startswith("all 3") for line in lines)
    d = stats.as_dict()
    assert d["per_pass"][-1]["passes"] == 1 and d["advice"] == stats.advice and "_timed" not in d


# -- the timeline ---------------------------------------------------------------------------------

def _check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG
    assert b"Software" in data[:400] and b"Matplotlib" in data[:400]      # what matplotlib writes


@pytest.mark.parametrize("where, lanes", [("cpu", ["compute"]), ("fake", ["upload", "compute"]),
                                          ("fake_gpu", ["copy", "expand", "compute"])])
def test_timeline_is_a_png_with_the_backends_lanes(where, lanes, tmp_path, monkeypatch, device_clock):
    """Decode workers' lanes first; then the copy lane where uploads take time (the CPU
    backend's do nothing), the expansion lane on CUDA, the compute lane."""
    pytest.importorskip("matplotlib")
    from vzstream import plot

    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)
    backend = {"cpu": vzstream.CpuBackend, "fake": vzstream.FakeBackend,
               "fake_gpu": lambda: CudaBackend("cpu", cuda=FakeCuda())}[where]()
    model, x = _paced(dtype=torch.bfloat16)
    with vzstream.session(model, backend=backend, prefetch=2, codec="zstd", workers=2) as s:
        with pytest.raises(vzstream.TraceError, match="no pass has been timed"):
            s.timeline(str(tmp_path / "none.png"))
        for _ in range(4):
            s(x)
        s.timeline(str(tmp_path / "t.png"), passes=2)
        labels = [label for label, _, _ in plot._lanes(list(s.member.runtime.timing.spans))]
    _check_png(tmp_path / "t.png")
    decode = labels[: -len(lanes)]
    assert labels[-len(lanes):] == lanes and decode and all(label.startswith("decode ") for label in decode)
    s.timeline(str(tmp_path / "after.png"), passes=1)            # the passes a closed session ran
    _check_png(tmp_path / "after.png")


def test_timeline_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)           # `import` raises ImportError
    stats, _ = _run(vzstream.FakeBackend(), 2, prefetch=1)
    model, x = _paced()
    with vzstream.session(model, device="cpu") as s:
        s(x)
        with pytest.raises(vzstream.MissingDependencyError, match=r"vzstream\[plot\]") as info:
            s.timeline(str(tmp_path / "t.png"))
    assert isinstance(info.value, ImportError)


def test_demo_draws_a_timeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from vzstream.__main__ import main

    model_dir = save_tiny_llama(tmp_path / "llama")
    out = tmp_path / "demo.png"
    assert main(["demo", str(model_dir), "--device", "cpu", "--tokens", "4", "--timeline", str(out)]) == 0
    _check_png(out)
    assert f"timeline of the last 3 passes: {out}" in capsys.readouterr().out


def test_spans_stay_in_a_bounded_ring(monkeypatch):
    """Memory does not grow with the number of passes (`bench soak` watches RSS over long runs):
    the ring grows to hold `RING_PASSES` passes of the largest one, within its bounds."""
    monkeypatch.setattr(timing_mod, "RING_MIN", 16)
    monkeypatch.setattr(timing_mod, "KEEP_PASSES", 5)
    stats, timing = _run(vzstream.FakeBackend(), 40, prefetch=1)
    per_pass = timing.spans.maxlen // timing_mod.RING_PASSES
    assert 6 * 3 <= per_pass <= 6 * 7              # a decode, an upload, a compute a unit; the stalls of the traced pass
    assert len(timing.spans) == timing.spans.maxlen and len(timing.closed) == 5
    assert timing.total.passes == 40 == stats.passes and len(stats.per_pass) == 5 and len(timing.stalled) <= 6
    monkeypatch.setattr(timing_mod, "RING_MAX", 64)
    _, timing = _run(vzstream.FakeBackend(), 40, prefetch=1)
    assert len(timing.spans) == 64 == timing._open.maxlen


def test_workers_thread_names_are_the_decode_lanes():
    stats, timing = _run(vzstream.FakeBackend(), 3, prefetch=2, workers=2)
    lanes = {lane for kind, lane, *_ in timing.spans if kind == "decode"}
    assert lanes and lanes <= {"vzstream-decode_0", "vzstream-decode_1"}
    assert threading.current_thread().name not in lanes


# -- item 4: prefetch="auto" ----------------------------------------------------------------------

def _auto(backend, passes: int, compute_s: float, **options):
    """`passes` passes with prefetch="auto", each output checked against the resident one;
    the session's stats, and its plan's resident count before and after choosing."""
    model, x = _paced(compute_s=compute_s)
    with torch.no_grad():
        ref = model(x)
    options.setdefault("prefetch", "auto")
    with vzstream.session(model, backend=backend, **options) as s:
        for _ in range(passes):
            assert torch.equal(s(x), ref)
            if "vram_budget" in options:
                assert backend.device_nbytes <= s.pool.budget or backend.device_nbytes <= s.member.needs.cap
        return s.stats()


def test_auto_prefetch_goes_deeper_when_decode_is_slow():
    """12 ms of decode a unit against 5 ms of compute: one unit ahead cannot hide it; three
    can (15 ms of compute meanwhile, on 4 workers). Exact throughout."""
    stats = _auto(vzstream.FakeBackend(delays={("decode", "*"): 0.012}), 12, 0.005, workers=4)
    assert stats.prefetch >= 2 and stats.prefetch_why.startswith(f"prefetch={stats.prefetch}:"), stats.prefetch_why
    assert "1: " in stats.prefetch_why                      # depth 1 was tried and stalled


def test_auto_prefetch_stays_at_one_when_decode_is_fast():
    stats = _auto(vzstream.FakeBackend(), 6, 0.005, workers=2)
    assert stats.prefetch == 1 and "the smallest value" in stats.prefetch_why, stats.prefetch_why
    assert "\nauto          prefetch=1: " in str(stats)


def test_auto_prefetch_stays_in_budget_and_gives_the_spare_slots_to_resident_units():
    """16 units under a budget of 10: slots for depth 4 while trying (6 slots, 4 units
    resident); once depth 1 is chosen, the pool plans again with 3 slots fewer, and units
    they would have held stay resident. Exact and within the budget throughout."""
    model, x = _paced(num_blocks=16, compute_s=0.002)
    unit = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    budget = 10 * unit + 4096
    fb = vzstream.FakeBackend()
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, backend=fb, prefetch="auto", workers=2, vram_budget=budget) as s:
        resident_while_trying = s.stats().units_resident
        for _ in range(10):
            assert torch.equal(s(x), ref)
            assert fb.device_nbytes <= budget
        stats = s.stats()
    assert stats.prefetch == 1, stats.prefetch_why
    assert stats.units_resident > resident_while_trying


def test_auto_workers_adds_threads_when_decode_is_slow(monkeypatch):
    """workers="auto" on 2 cores tries 1 and 2 decode threads: 10 ms of decode a unit against
    4 ms of compute, 2 ahead, needs both (one thread cannot decode a unit per compute slice);
    with no decode delay one is enough. Exact throughout."""
    monkeypatch.setattr("vzstream.config.available_cores", lambda: 2)
    slow = _auto(vzstream.FakeBackend(delays={("decode", "*"): 0.010}), 8, 0.004, workers="auto", prefetch=2)
    assert slow.workers == 2 and slow.prefetch_why.startswith("workers=2:"), slow.prefetch_why
    fast = _auto(vzstream.FakeBackend(), 6, 0.004, workers="auto", prefetch=2)
    assert fast.workers == 1 and "the smallest value" in fast.prefetch_why, fast.prefetch_why
