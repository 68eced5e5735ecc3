"""`python -m vzstream bench gpu [--out DIR] [--quick]`: vzstream on one CUDA GPU against resident,
accelerate `cpu_offload` and diffusers group offloading, all in one process on the same card.

Per model (tinyllama-1.1b architecture, random init on the GPU, seeded, bf16; llama-3-8b under a
4 GiB budget when time allows): greedy decode of batch 1 and a prefill of batch 4 x 1024, for each
method: tokens/s, the fraction of the bound (docs/design.md, "Performance model") reached, peak VRAM (`max_memory_allocated`
after `reset_peak_memory_stats`), host RSS (and RSS above the process's idle RSS), and whether the
tokens equal the resident run's. Then the `bench budget` sweep (the planner's minimum, the middle,
all resident) on the same card, with vzstream's own device accounting beside
`torch.cuda.max_memory_allocated` to cross-check it.

Bound per pass = max(C, wire / W_pcie, D / W_dec), which is max(C, B / min(W_pcie, W_dec)) when
every streamed unit is zstd-compressed. C is the resident pass time, B the bytes streamed per pass
(`Stats.streamed_nbytes_per_pass`: the raw bytes of the streamed units), wire what of it crosses
PCIe (B, less what nibble-coded planes save: `UnitStore.wire_nbytes`), D B's share decoded on the
host (units with zstd frames), W_pcie the pinned host→device
bandwidth (256 MiB copies timed with CUDA events) and W_dec the workers' decode rate in the same
bytes: the streamed units' raw bytes / the time a thread pool of `workers` threads takes to decode
every compressed frame of them once, each thread into a frame-sized buffer of its own
(`calibrate.decode_gbps`, which `raw_fraction="auto"` runs on one unit at open). With nothing streamed the bound
is C. The baselines are held to the same bound.

Warm-up is excluded, every timer stops after `torch.cuda.synchronize()`, times are medians.
Nothing is asserted: a benchmark reports. Each row is printed and appended to
`<out>/<table>.rows.jsonl` as soon as it is measured, and the configuration (with the bound's
inputs) is kept in `<out>/gpu.config.json`, so a run cut short keeps what it measured; at the end
each table is printed, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager

import psutil
import torch

import vzstream
from vzstream import calibrate

from .common import greedy, report
from .device import event_time_s, measure_merge, measure_pcie, profile_to, timed  # noqa: F401 (tests patch them here)
from .models import build_model, prompt
from .targets import TARGET_COLUMNS, targets

COLUMNS = ["model", "method", "decode_tok_s", "decode_bound_frac", "prefill_tok_s", "prefill_bound_frac",
           "peak_vram_gib", "host_rss_gib", "host_above_idle_gib", "tokens_equal", "note"]
BUDGET_COLUMNS = ["budget_mib", "units_resident", "streamed_mib_per_pass", "peak_device_mib",
                  "cuda_peak_allocated_mib", "tokens_per_s", "tokens_equal"]
GIB = 2**30


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m vzstream bench gpu")
    ap.add_argument("--out", default=None, help="write the tables, rows as measured, config and a trace here")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 layers, few tokens, no 8B")
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-8b", action="store_true", help="skip the llama-3-8b budget row")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip optional rows past this")
    args = ap.parse_args(argv)
    args.layers = 4 if args.quick else None
    args.tokens, args.slow_tokens, args.warm_tokens = (8, 4, 2) if args.quick else (64, 16, 4)
    args.prefill = (1, 128) if args.quick else (4, 1024)       # batch, length
    args.repeat = 1 if args.quick else 3
    args.pcie_nbytes = (64 if args.quick else 256) << 20
    args.idle_rss = 0                # set by main once CUDA is up
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("vzstream bench gpu needs a CUDA GPU: torch.cuda.is_available() is False on this "
              "machine (no GPU, or a CPU-only torch build). Run it on a CUDA machine.")
        return 2
    import transformers  # noqa: F401 (every method pays for it: part of the idle RSS)

    run = Run(args.out)
    pcie_gbps, merge_gbps = measure_pcie(args.pcie_nbytes), measure_merge(args.pcie_nbytes)
    _free_gpu()
    args.idle_rss = psutil.Process().memory_info().rss    # CUDA up, no model built yet
    defaults = vzstream.SessionConfig()
    run.config.update(vars(args), pcie_gbps=pcie_gbps, merge_gbps=merge_gbps, device=torch.cuda.get_device_name(),
                      workers=defaults.workers, gil_switch_interval=defaults.gil_switch_interval,
                      frame_nbytes=vzstream.codec.FRAME_NBYTES)
    run.save_config()
    print(f"device {run.config['device']}, pinned host->device {pcie_gbps:.1f} GB/s, plane merge "
          f"{merge_gbps:.0f} GB/s, {run.config['workers']} decode workers", flush=True)
    bench_preset(run, args.preset, args, pcie_gbps)
    # The 8B rows before the sweep: the issue asks for them, the sweep is a cross-check.
    if not (args.quick or args.no_8b) and run.time_left(args, 120, "llama-3-8b", "-"):
        bench_8b(run, args, pcie_gbps)
    if run.time_left(args, 60, args.preset, "budget sweep"):
        with run.section(args.preset, "budget sweep"):
            bench_budget(run, args)
    run.config["elapsed_s"] = run.elapsed()
    run.save_config()
    if run.tables.get("gpu_budget"):
        report("gpu_budget", run.tables["gpu_budget"], BUDGET_COLUMNS, run.config, args.out)
    report("gpu", run.rows, COLUMNS, run.config, args.out)
    name = args.preset if args.layers is None else f"{args.preset} ({args.layers} layers)"
    report("gpu_targets", targets(run.rows, name), TARGET_COLUMNS, run.config, args.out)
    return 0


class Run:
    """The rows of one run, each printed on one line and appended to `<out>/<table>.rows.jsonl`
    the moment it is measured, and the configuration in `<out>/gpu.config.json`, so a run cut
    short (a time limit, a crash) leaves what it measured. A section that raises becomes a
    `failed:` row; the run goes on with the next one."""

    def __init__(self, out: str | None) -> None:
        self.tables: dict[str, list[dict]] = {"gpu": []}
        self.config: dict = {}
        self.t0, self.out = time.perf_counter(), out
        if out:
            os.makedirs(out, exist_ok=True)
            for name in ("gpu", "gpu_budget"):
                open(os.path.join(out, f"{name}.rows.jsonl"), "w").close()

    @property
    def rows(self) -> list[dict]:
        return self.tables["gpu"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: dict, table: str = "gpu") -> None:
        self.tables.setdefault(table, []).append(row)
        label = "" if table == "gpu" else f"{table}: "
        print(f"[{self.elapsed():4.0f} s] {label}" + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        if self.out:
            with open(os.path.join(self.out, f"{table}.rows.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_config(self) -> None:
        if self.out:
            with open(os.path.join(self.out, "gpu.config.json"), "w") as f:
                json.dump(self.config, f, indent=1, default=str)

    @contextmanager
    def section(self, model: str, method: str):
        try:
            yield
        except Exception as exc:
            traceback.print_exc(file=sys.stdout)
            self.add({"model": model, "method": method, "note": f"failed: {type(exc).__name__}: {exc}"[:300]})
        finally:
            _free_gpu()

    def time_left(self, args, needed_s: float, model: str, method: str) -> bool:
        """False, and a row saying so, if under `needed_s` of the `--budget-s` remain."""
        if args.budget_s - self.elapsed() >= needed_s:
            return True
        self.add({"model": model, "method": method, "note": f"skipped: under {needed_s:.0f} s of --budget-s left"})
        return False


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- measurements -----------------------------------------------------------------------------
def measure(gen, forward, args, tokens: int, repeat: int) -> dict:
    """Warm up, then time greedy decoding of `tokens` and the prefill; peak VRAM, the prefill's
    activation peak (above what was allocated before it), and RSS."""
    with torch.no_grad():
        gen(args.warm_tokens)                           # learns the trace, warms the caches
        forward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gen_s, out = timed(lambda: gen(tokens), repeat)
        gen_peak, before = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prefill_s, _ = timed(forward, repeat)
        prefill_peak = torch.cuda.max_memory_allocated()
    return dict(gen_s=gen_s, pass_s=gen_s / tokens, prefill_s=prefill_s, tokens=out.cpu(),
                peak=max(gen_peak, prefill_peak), prefill_act=max(0, prefill_peak - before),
                rss=psutil.Process().memory_info().rss)


def row(model: str, method: str, m: dict, args, tokens: int, bound: dict | None, ref, note: str = "") -> dict:
    """A method's row; its fractions of the bound when it is held to one (not the resident run)."""
    batch, length = args.prefill
    equal = ref is None or bool(torch.equal(m["tokens"], ref[:, : m["tokens"].shape[1]]))
    return dict(model=model, method=method, decode_tok_s=tokens / m["gen_s"],
                decode_bound_frac=bound["decode_s"] / m["pass_s"] if bound else "",
                prefill_tok_s=batch * length / m["prefill_s"],
                prefill_bound_frac=bound["prefill_s"] / m["prefill_s"] if bound else "",
                peak_vram_gib=m["peak"] / GIB, host_rss_gib=m["rss"] / GIB,
                host_above_idle_gib=(m["rss"] - args.idle_rss) / GIB, tokens_equal=equal, note=note)


def _free_gpu() -> None:
    """Between methods only, so each starts from the same state: no cached device blocks, and no
    cached pinned host blocks (a method's staging, diffusers' pinned copies) in the next one's RSS."""
    gc.collect()
    empty_host = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    try:
        torch.cuda.empty_cache()
        if empty_host is not None:
            empty_host()
    except RuntimeError:    # no accelerator (this harness's CPU test), or a CUDA error already reported
        pass


# -- methods ----------------------------------------------------------------------------------
def bench_preset(run: Run, preset: str, args, pcie_gbps: float) -> None:
    """Resident, the bound, vzstream at each prefetch depth, then the two baselines."""
    name = preset if args.layers is None else f"{preset} ({args.layers} layers)"
    model = build_model(preset, layers=args.layers, device="cuda")     # random init on the GPU: fast
    ids = prompt(model).cuda()
    prefill_ids = prompt(model, *args.prefill, seed=1).cuda()
    res = measure(lambda n: greedy(model.generate, ids, n),
                  lambda: model(prefill_ids, logits_to_keep=1), args, args.tokens, args.repeat)
    run.add(row(name, "resident", res, args, args.tokens, None, None))
    model.cpu()
    _free_gpu()
    bound = None
    for k in args.prefetch:
        method = f"vzstream prefetch={k}"
        with run.section(name, method):
            bound = bench_vzstream(run, name, method, model, ids, prefill_ids, args, res, bound, pcie_gbps,
                                   args.tokens, args.repeat, prefetch=k)
    if bound and calibrate.balanced_fraction(bound["decode_gbps"], bound["pcie_gbps"]):   # decode is the limit
        k = max(args.prefetch)
        method = f"vzstream prefetch={k} raw_fraction=auto"
        with run.section(name, method):
            bench_vzstream(run, name, method, model, ids, prefill_ids, args, res, None, pcie_gbps,
                           args.tokens, args.repeat, prefetch=k, raw_fraction="auto")
    k = max(args.prefetch)                  # the device expands the codes: no host decode at all
    with run.section(name, f"vzstream prefetch={k} codec=nibble"):
        bench_vzstream(run, name, f"vzstream prefetch={k} codec=nibble", model, ids, prefill_ids, args, res, None,
                       pcie_gbps, args.tokens, args.repeat, prefetch=k, codec="nibble")
    if args.out:
        with run.section(name, "trace"):
            trace(model, ids, args, os.path.join(args.out, f"trace_prefetch{args.prefetch[0]}.json.gz"))
        with run.section(name, "trace codec=nibble"):     # the expansions' device time, the upload's issue
            trace(model, ids, args, os.path.join(args.out, f"trace_prefetch{k}_nibble.json.gz"), prefetch=k,
                  codec="nibble")
    model = None                 # the baselines build their own: one copy in RAM at a time
    baseline(run, preset, "diffusers group offload", "diffusers", run_diffusers, args, ids, prefill_ids, bound,
             res["tokens"])
    baseline(run, preset, "accelerate cpu_offload", "accelerate", run_accelerate, args, ids, prefill_ids, bound,
             res["tokens"])


def bench_vzstream(run: Run, name: str, method: str, model, ids, prefill_ids, args, res: dict, bound,
                   pcie_gbps: float, tokens: int, repeat: int, **options) -> dict:
    """One streamed row, preceded by the bound's row when this is the first session to run (it
    gives B and W_dec). Returns the bound. The session lives only in this frame: a closed
    session still references the model, and must not keep it alive once the caller drops it."""
    with vzstream.session(model, device="cuda", **options) as s:
        m = measure(lambda n: greedy(s.generate, ids, n),
                    lambda: s(prefill_ids, logits_to_keep=1), args, tokens, repeat)
        stats = s.stats()
        if bound is None:
            bound = make_bound(res, stats, s, pcie_gbps)
            label = "bound" + (f" raw_fraction={stats.raw_fraction:.2f}" if s.config.raw_fraction else "")
            label += " codec=nibble" if s.config.codec == "nibble" else ""
            run.config[f"{name}, {label}"] = bound
            run.save_config()
            run.add(bound_row(name, bound, args, label))
    note = (f"{stats.units_resident} units resident, stall {100 * stats.stall_fraction:.0f}%, "
            f"ratio {stats.ratio:.3f}")
    if stats.upload_issue_s:            # codec="nibble": the forward thread issues the uploads
        note += f", issuing uploads {100 * stats.upload_issue_s / max(stats.wall_s, 1e-9):.0f}% of forward time"
    if stats.upload_gbps_measured:      # raw_fraction="auto": what the session measured and chose
        note += (f", auto: decode {stats.decode_gbps_measured:.1f}, upload {stats.upload_gbps_measured:.1f} GB/s"
                 f" -> {stats.raw_fraction:.2f} raw")
    run.add(row(name, method, m, args, tokens, bound, res["tokens"], note))
    return bound


def trace(model, ids, args, path: str, **options) -> None:
    options.setdefault("prefetch", args.prefetch[0])
    with vzstream.session(model, device="cuda", **options) as s:
        greedy(s.generate, ids, args.warm_tokens)                     # learns the trace
        profile_to(path, lambda: greedy(s.generate, ids, args.warm_tokens))


def make_bound(res: dict, stats, s, pcie_gbps: float) -> dict:
    """The bound (docs/design.md, "Performance model") per pass, for decode (C = resident time per token) and for the prefill."""
    B = stats.streamed_nbytes_per_pass         # the raw bytes of the units fetched per pass
    streamed = list(s.stores.values())         # the streamed units only (resident ones are not here)
    raw = sum(store.raw_nbytes for store in streamed) or 1
    # What crosses PCIe: B, less what nibble-coded planes save (the device expands them). Units
    # kept raw (`raw_fraction`) or nibble-coded upload without a host decode: D, the bytes decoded
    # per pass, is B's share of units with zstd frames. With D = B = wire: B / min(W_pcie, W_dec).
    wire = B * sum(store.wire_nbytes for store in streamed) / raw
    decoded = [st for st in streamed if any(pl.frames for pk in st.packed for pl in pk.planes)]
    D = B * sum(store.raw_nbytes for store in decoded) / raw
    decode_gbps = calibrate.decode_gbps(decoded, s.config.workers, max_nbytes=None) if B and D else None
    transfer_s = max(wire / (pcie_gbps * 1e9), D / (decode_gbps * 1e9) if decode_gbps else 0.0)
    return dict(decode_s=max(res["pass_s"], transfer_s), prefill_s=max(res["prefill_s"], transfer_s),
                streamed_nbytes_per_pass=B, wire_nbytes_per_pass=wire, pcie_gbps=pcie_gbps, decode_gbps=decode_gbps,
                transfer_s_per_pass=transfer_s, resident_decode_s_per_pass=res["pass_s"],
                resident_prefill_s=res["prefill_s"])


def bound_row(name: str, bound: dict, args, label: str = "bound") -> dict:
    """The bound as a row of the table: the tokens/s no streaming method can beat."""
    batch, length = args.prefill
    dec = "-" if bound["decode_gbps"] is None else f"{bound['decode_gbps']:.1f}"
    return dict(model=name, method=label, decode_tok_s=1 / bound["decode_s"], decode_bound_frac=1.0,
                prefill_tok_s=batch * length / bound["prefill_s"], prefill_bound_frac=1.0,
                note=(f"B {bound['streamed_nbytes_per_pass'] / GIB:.2f} GiB/pass ({bound['wire_nbytes_per_pass'] / GIB:.2f} "
                      f"over PCIe), W_pcie {bound['pcie_gbps']:.1f}, W_dec {dec} GB/s"))


def baseline(run: Run, preset, method, module: str, fn, args, ids, prefill_ids, bound, ref) -> None:
    """A baseline on a freshly built (same seed) model, so the process holds one copy of it."""
    name = preset if args.layers is None else f"{preset} ({args.layers} layers)"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        run.add({"model": name, "method": method, "note": f"skipped: {exc}"})
        return
    with run.section(name, method):
        model = build_model(preset, layers=args.layers, device="cuda").cpu()
        try:
            m, tokens, note = fn(model, args, ids, prefill_ids)
        finally:
            model = None         # before the section frees the GPU, also when it failed
        run.add(row(name, method, m, args, tokens, bound, ref, note))


def run_diffusers(model, args, ids, prefill_ids):
    from diffusers.hooks import apply_group_offloading

    # Applied to the decoder so its `layers` form the groups (on the CausalLM wrapper every
    # child would be one unmatched group); lm_head stays resident as in vzstream's "blocks".
    model.lm_head.cuda()
    apply_group_offloading(model.model, onload_device=torch.device("cuda"), offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True)
    m = measure(lambda n: greedy(model.generate, ids, n),
                lambda: model(prefill_ids, logits_to_keep=1), args, args.tokens, args.repeat)
    return m, args.tokens, "embed + norm move each pass (unmatched group)"


def run_accelerate(model, args, ids, prefill_ids):
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=torch.device("cuda"))
    # Synchronous pageable copies of every weight, every pass: fewer tokens, one timed run.
    m = measure(lambda n: greedy(model.generate, ids, n),
                lambda: model(prefill_ids, logits_to_keep=1), args, args.slow_tokens, 1)
    return m, args.slow_tokens, f"{args.slow_tokens} tokens, 1 run"


def bench_budget(run: Run, args) -> None:
    """The `bench budget` sweep on this GPU: minimum, middle, all resident (decode only)."""
    from .budget import budget_points, sweep

    model = build_model(args.preset, layers=args.layers, device="cuda")
    ids = prompt(model).cuda()
    with torch.no_grad():
        ref = greedy(model.generate, ids, args.slow_tokens)
    model.cpu()
    _free_gpu()
    sweep(model, ids, ref, "cuda", budget_points(model, "cuda", 2, 3), 2, args.slow_tokens, 2,
          on_row=lambda r: run.add(r, table="gpu_budget"))


def bench_8b(run: Run, args, pcie_gbps: float) -> None:
    """llama-3-8b: resident, then streamed under `vram_budget="4GiB"` (16 tokens), with the
    activation reserve the resident run measured for the prefill (the first, traced call is a
    small one: measured there, the reserve would not cover the 4 x 1024 prefill)."""
    preset, tokens = "llama-3-8b", 16
    model = build_model(preset, device="cuda")                        # 16 GB, initialised in seconds
    ids, prefill_ids = prompt(model).cuda(), prompt(model, *args.prefill, seed=1).cuda()
    res = None
    with run.section(preset, "resident"):
        res = measure(lambda n: greedy(model.generate, ids, n),
                      lambda: model(prefill_ids, logits_to_keep=1), args, tokens, 2)
        run.add(row(preset, "resident", res, args, tokens, None, None))
    model.cpu()
    _free_gpu()
    if res is None:
        return
    reserve = res["prefill_act"]
    method = f"vzstream prefetch=2 vram_budget=4GiB activation_reserve={reserve / GIB:.2f}GiB"
    with run.section(preset, method):
        bench_vzstream(run, preset, method, model, ids, prefill_ids, args, res, None, pcie_gbps, tokens, 2,
                       prefetch=2, vram_budget="4GiB", activation_reserve=reserve)
