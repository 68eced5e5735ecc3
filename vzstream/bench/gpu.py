"""`python -m vzstream bench gpu [--out DIR] [--quick] [--budget-s S]`: vzstream on one CUDA GPU
against resident, diffusers group offloading, accelerate `cpu_offload` and DFloat11 `cpu_offload`,
all in one process on the same card, then one `VERDICT` line per target of the issue.

Rows for the tinyllama-1.1b architecture (random init on the GPU, seeded, bf16): resident;
vzstream `codec="auto"` (nibble on CUDA: the GPU expands 4-bit codes) at prefetch 1/2/4 and
`codec="zstd"` (host threads decode) at the deepest; diffusers as its docs set it up fastest, and
as configured before; accelerate; DFloat11. Then llama-3-8b resident and under a 4 GiB budget, and
the `bench budget` sweep (vzstream's device accounting beside `torch.cuda.max_memory_allocated`).
Rows that no target reads (zstd, DFloat11, the traces, the sweep) and the 8B rows are skipped, with
a row saying so, when `--budget-s` runs short; the optional tinyllama ones leave the 8B its time.

Each row: greedy decode at batch 1 and a prefill of batch 4 x 1024 (tokens/s), the share of the
wire bound reached by both, the wire bytes per pass, peak VRAM (`max_memory_allocated` after
`reset_peak_memory_stats`), host RSS and RSS above the process's idle RSS, and whether the tokens
equal the resident run's. Wire bound per pass = max(C, wire / W_pcie): wire is what the method
moves host -> device per forward pass (vzstream: `UnitStore.wire_nbytes` of the units it streams;
the bf16 offloaders: the raw bytes of what they offload; DFloat11: its compressed tensors), W_pcie
this card's pinned host -> device rate (large copies timed with CUDA events), C the resident run's
time for the same pass, which no offloader beats. The resident row is C and has no share.

Warm-up is excluded, every timer stops after `torch.cuda.synchronize()`, times are medians. Each
row is printed and appended to `<out>/<table>.rows.jsonl` as soon as it is measured, and the
configuration in `<out>/gpu.config.json`, so a run cut short keeps what it measured (`python -m
vzstream.bench.targets <out>` reads the verdicts off it); at the end each table is printed, then
one JSON line, then the verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import psutil
import torch

import vzstream
from vzstream import calibrate
from vzstream.headroom import kv_growth_nbytes

from .common import greedy, report
from .device import event_time_s, measure_merge, measure_pcie, profile_to, timed  # noqa: F401 (tests patch them here)
from .models import build_model, model_nbytes, prompt
from .targets import (ACCELERATE, BIG, DFLOAT11, DIFFUSERS_FAIR, DIFFUSERS_TODAY, TARGET_COLUMNS, model_label,
                      verdict_lines, verdicts)

COLUMNS = ["model", "method", "decode_tok_s", "decode_wire_frac", "prefill_tok_s", "prefill_wire_frac",
           "wire_gib_per_pass", "peak_vram_gib", "host_rss_gib", "host_above_idle_gib", "tokens_equal", "note"]
BUDGET_COLUMNS = ["budget_mib", "units_resident", "streamed_mib_per_pass", "peak_device_mib",
                  "cuda_peak_allocated_mib", "tokens_per_s", "tokens_equal"]
GIB = 2**30
BIG_S = 120          # what the llama-3-8b rows need of --budget-s (build, resident, pack, stream)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m vzstream bench gpu")
    ap.add_argument("--out", default=None, help="write the tables, rows as measured, config and traces here")
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
    args.reserve_s = 0 if args.quick or args.no_8b else BIG_S  # kept for the 8B by the optional rows before it
    args.idle_rss, args.pcie_gbps = 0, None                    # set by main once CUDA is up
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("vzstream bench gpu needs a CUDA GPU: torch.cuda.is_available() is False on this "
              "machine (no GPU, or a CPU-only torch build). Run it on a CUDA machine.")
        return 2
    import transformers  # noqa: F401 (every method pays for it: part of the idle RSS)

    run = Run(args.out)
    args.pcie_gbps, merge_gbps = measure_pcie(args.pcie_nbytes), measure_merge(args.pcie_nbytes)
    _free_gpu()
    args.idle_rss = psutil.Process().memory_info().rss    # CUDA up, no model built yet
    defaults = vzstream.SessionConfig()
    run.config.update(vars(args), merge_gbps=merge_gbps, device=torch.cuda.get_device_name(),
                      workers=defaults.workers, gil_switch_interval=defaults.gil_switch_interval,
                      frame_nbytes=vzstream.codec.FRAME_NBYTES)
    run.save_config()
    print(f"device {run.config['device']}, pinned host->device {args.pcie_gbps:.1f} GB/s, plane merge "
          f"{merge_gbps:.0f} GB/s, {run.config['workers']} decode workers", flush=True)
    bench_preset(run, args)
    if args.reserve_s and run.time_left(args, BIG_S, BIG, "-"):
        bench_8b(run, args)
    if run.time_left(args, 60, args.preset, "budget sweep"):
        with run.section(args.preset, "budget sweep"):
            bench_budget(run, args)
    run.config["elapsed_s"] = run.elapsed()
    run.save_config()
    if run.tables.get("gpu_budget"):
        report("gpu_budget", run.tables["gpu_budget"], BUDGET_COLUMNS, run.config, args.out)
    report("gpu", run.rows, COLUMNS, run.config, args.out)
    found = verdicts(run.rows, model_label(args.preset, args.layers), args.prefill)
    report("gpu_targets", found, TARGET_COLUMNS, run.config, args.out)
    print("\n".join(verdict_lines(found)), flush=True)
    return 0


class Run:
    """The rows of one run, each printed on one line and appended to `<out>/<table>.rows.jsonl`
    the moment it is measured, and the configuration in `<out>/gpu.config.json`, so a run cut
    short (a time limit, a crash) leaves what it measured. A section that raises becomes a
    `failed:` row (`skipped:` for an optional one); the run goes on with the next one."""

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
    def section(self, model: str, method: str, outcome: str = "failed"):
        try:
            yield
        except Exception as exc:
            traceback.print_exc(file=sys.stdout)
            self.add({"model": model, "method": method, "note": f"{outcome}: {type(exc).__name__}: {exc}"[:300]})
        finally:
            _free_gpu()

    def time_left(self, args, needed_s: float, model: str, method: str, reserve_s: float = 0.0) -> bool:
        """False, and a row saying so, if under `needed_s` of the `--budget-s` remain beyond
        `reserve_s` (what a later section is promised)."""
        if args.budget_s - self.elapsed() - reserve_s >= needed_s:
            return True
        kept = f" beyond the {reserve_s:.0f} s kept for {BIG}" if reserve_s else ""
        self.add({"model": model, "method": method, "note": f"skipped: under {needed_s:.0f} s of --budget-s left{kept}"})
        return False


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- measurements -----------------------------------------------------------------------------
@dataclass
class Case:
    """One model's inputs and its resident run, which every other row of it is compared with."""

    name: str                 # the model's label in the rows
    preset: str
    layers: int | None
    ids: torch.Tensor         # the decode prompt, [1, 16]
    prefill_ids: torch.Tensor  # [batch, length]
    res: dict | None = None   # `measure` of the resident run: C and the reference tokens


def make_case(preset: str, layers: int | None, model, args) -> Case:
    return Case(model_label(preset, layers), preset, layers, prompt(model).cuda(),
                prompt(model, *args.prefill, seed=1).cuda())


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


def measure_model(model, case: Case, args, tokens: int, repeat: int) -> dict:
    """`measure` of a model whose own `generate` and forward run the method (resident, baselines)."""
    return measure(lambda n: greedy(model.generate, case.ids, n),
                   lambda: model(case.prefill_ids, logits_to_keep=1), args, tokens, repeat)


def row(case: Case, method: str, m: dict, args, tokens: int, wire_nbytes: float, note: str = "") -> dict:
    """A method's row, with its shares of the wire bound, max(C, wire / W_pcie) / its time; not for
    the resident run itself (`m` is `case.res`), which is C."""
    batch, length = args.prefill
    res, wire_s = case.res, wire_nbytes / (args.pcie_gbps * 1e9)
    held = m is not res          # the resident run is C itself; its tokens are the reference
    equal = not held or bool(torch.equal(m["tokens"], res["tokens"][:, : m["tokens"].shape[1]]))
    return dict(model=case.name, method=method, decode_tok_s=tokens / m["gen_s"],
                decode_wire_frac=max(res["pass_s"], wire_s) / m["pass_s"] if held else "",
                prefill_tok_s=batch * length / m["prefill_s"],
                prefill_wire_frac=max(res["prefill_s"], wire_s) / m["prefill_s"] if held else "",
                wire_gib_per_pass=wire_nbytes / GIB, peak_vram_gib=m["peak"] / GIB, host_rss_gib=m["rss"] / GIB,
                host_above_idle_gib=(m["rss"] - args.idle_rss) / GIB, tokens_equal=equal, note=note)


def bench_resident(run: Run, case: Case, model, args, tokens: int, repeat: int) -> None:
    case.res = measure_model(model, case, args, tokens, repeat)
    run.add(row(case, "resident", case.res, args, tokens, 0))
    run.config[f"{case.name}, resident"] = dict(decode_s_per_pass=case.res["pass_s"], prefill_s=case.res["prefill_s"])


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


def _nbytes(module) -> int:
    """Parameters and buffers: what an offloader that moves a whole module moves."""
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


# -- methods ----------------------------------------------------------------------------------
def bench_preset(run: Run, args) -> None:
    """Resident, vzstream auto at each prefetch depth, the baselines that targets read; then, if
    time is left beyond the 8B's share, vzstream zstd, the traces and DFloat11."""
    build = partial(build_model, args.preset, layers=args.layers, device="cuda")   # random init on the GPU: fast
    model = build()
    case = make_case(args.preset, args.layers, model, args)
    bench_resident(run, case, model, args, args.tokens, args.repeat)
    model.cpu()
    _free_gpu()
    for k in args.prefetch:
        method = f"vzstream prefetch={k} codec=auto"
        with run.section(case.name, method):
            bench_vzstream(run, case, method, model, args, args.tokens, args.repeat, prefetch=k, codec="auto")
    model = None                 # the baselines build their own: one copy in RAM at a time
    baseline(run, case, DIFFUSERS_FAIR, "diffusers", run_diffusers_fair, args)
    baseline(run, case, DIFFUSERS_TODAY, "diffusers", run_diffusers_today, args)
    baseline(run, case, ACCELERATE, "accelerate", run_accelerate, args)
    deepest = max(args.prefetch)
    method = f"vzstream prefetch={deepest} codec=zstd"
    if run.time_left(args, 40, case.name, method, args.reserve_s):
        model = build().cpu()
        with run.section(case.name, method):
            bench_vzstream(run, case, method, model, args, args.tokens, args.repeat, prefetch=deepest, codec="zstd")
        for k, codec in ((args.prefetch[0], "auto"), (deepest, "zstd")):  # auto: uploads only; zstd: decode too
            if args.out and run.time_left(args, 15, case.name, f"trace codec={codec}", args.reserve_s):
                with run.section(case.name, f"trace codec={codec}"):
                    trace(model, case, args, os.path.join(args.out, f"trace_prefetch{k}_{codec}.json.gz"),
                          prefetch=k, codec=codec)
        model = None
    spare_s = args.budget_s - run.elapsed() - args.reserve_s
    baseline(run, case, DFLOAT11, "dfloat11", partial(run_dfloat11, spare_s=spare_s), args, optional=True)


def bench_vzstream(run: Run, case: Case, method: str, model, args, tokens: int, repeat: int, **options) -> None:
    """One streamed row. The session lives only in this frame: a closed session still references
    the model, and must not keep it alive once the caller drops it."""
    with vzstream.session(model, device="cuda", **options) as s:
        m = measure(lambda n: greedy(s.generate, case.ids, n),
                    lambda: s(case.prefill_ids, logits_to_keep=1), args, tokens, repeat)
        stats = s.stats()
        wire, codec = wire_nbytes(s, stats), s.config.codec
        # The wire bound leaves host decoding out: W_dec (None: no zstd frames) says when it sets the pace.
        decode_gbps = calibrate.decode_gbps(list(s.stores.values()), s.config.workers)
    note = (f"codec {codec}, {stats.units_resident} units resident, stall {100 * stats.stall_fraction:.0f}%, "
            f"ratio {stats.ratio:.3f}")
    if decode_gbps:
        note += f", W_dec {decode_gbps:.1f} GB/s"
    run.add(row(case, method, m, args, tokens, wire, note))


def wire_nbytes(s, stats) -> float:
    """Bytes a pass moves host -> device: B (`streamed_nbytes_per_pass`, the raw bytes of the units
    fetched per pass) at the streamed stores' wire / raw ratio (nibble-coded planes cross PCIe as
    4-bit codes the device expands; other planes at their decoded size)."""
    streamed = list(s.stores.values())         # the streamed units only (resident ones are not here)
    raw = sum(store.raw_nbytes for store in streamed) or 1
    return stats.streamed_nbytes_per_pass * sum(store.wire_nbytes for store in streamed) / raw


def trace(model, case: Case, args, path: str, **options) -> None:
    with vzstream.session(model, device="cuda", **options) as s:
        greedy(s.generate, case.ids, args.warm_tokens)                     # learns the trace
        profile_to(path, lambda: greedy(s.generate, case.ids, args.warm_tokens))


def baseline(run: Run, case: Case, method: str, module: str, fn, args, optional: bool = False) -> None:
    """A baseline on a freshly built (same seed) model, so the process holds one copy of it.
    `fn(model, args, case)` returns (measure, tokens, wire bytes per pass, note). A package that
    does not import is a skipped row; so is any failure of an `optional` baseline."""
    try:
        importlib.import_module(module)
    except Exception as exc:        # ImportError; dfloat11 also loads a CUDA kernel when imported
        reason = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        run.add({"model": case.name, "method": method, "note": f"skipped: {reason}"[:300]})
        return
    with run.section(case.name, method, "skipped" if optional else "failed"):
        model = build_model(case.preset, layers=case.layers, device="cuda").cpu()
        try:
            m, tokens, wire, note = fn(model, args, case)
        finally:
            model = None         # before the section frees the GPU, also when it failed
        run.add(row(case, method, m, args, tokens, wire, note))


def run_diffusers_fair(model, args, case: Case):
    """diffusers group offloading on what vzstream streams (the decoder layers; embeddings, final
    norm and head resident), set up as diffusers' docs say runs fastest: docs/source/en/
    optimization/memory.md ("Group offloading", "CUDA stream") and `apply_group_offloading`'s
    docstring. `use_stream=True` loads the next group while the current one computes, and with
    streams block_level wants `num_blocks_per_group=1`; `record_stream=True` gives "more of a
    speedup at the cost of slightly increased memory usage"; `low_cpu_mem_usage=True` "may
    increase overall execution time" (it pins on the fly), so it stays False; `non_blocking` is
    implied by the stream. block_level rather than leaf_level: whole layers per group mean fewer
    synchronisations ("faster than leaf-level/sequential offloading")."""
    from diffusers.hooks import apply_group_offloading

    # block_level puts every child of the module it is applied to that is not a ModuleList into
    # one group moved synchronously every pass (today's row), and has no option to leave a child
    # out: the children kept resident are taken out while the hooks go in. rotary_emb (~256 bytes
    # of buffers) stays in that group: diffusers hangs the hook that learns the layer order and
    # wires the prefetching on it; without it no group prefetches and none waits for its copies.
    base = model.model
    kept = {fqn: base._modules.pop(fqn) for fqn in ("embed_tokens", "norm")}
    apply_group_offloading(base, onload_device=torch.device("cuda"), offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True, record_stream=True, low_cpu_mem_usage=False)
    for fqn, module in kept.items():
        setattr(base, fqn, module.cuda())
    model.lm_head.cuda()
    m = measure_model(model, case, args, args.tokens, args.repeat)
    return m, args.tokens, _nbytes(base.layers), "block_level, 1 layer per group, use_stream, record_stream"


def run_diffusers_today(model, args, case: Case):
    # Applied to the decoder so its `layers` form the groups (on the CausalLM wrapper every
    # child would be one unmatched group); lm_head stays resident as in vzstream's "blocks".
    from diffusers.hooks import apply_group_offloading

    model.lm_head.cuda()
    apply_group_offloading(model.model, onload_device=torch.device("cuda"), offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True)
    m = measure_model(model, case, args, args.tokens, args.repeat)
    return m, args.tokens, _nbytes(model.model), "embed + norm move each pass (unmatched group), no record_stream"


def run_accelerate(model, args, case: Case):
    from accelerate import cpu_offload

    wire = model_nbytes(model)                                   # every parameter, every pass; buffers move once
    cpu_offload(model, execution_device=torch.device("cuda"))
    # Synchronous pageable copies of every weight, every pass: fewer tokens, one timed run.
    m = measure_model(model, case, args, args.slow_tokens, 1)
    return m, args.slow_tokens, wire, f"{args.slow_tokens} tokens, 1 run"


# What DFloat11 compresses: the decoder layers' linear weights, the units vzstream streams.
DF11_LAYERS = {r"model\.layers\.\d+": [f"self_attn.{p}_proj" for p in "qkvo"]
               + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]}


def run_dfloat11(model, args, case: Case, spare_s: float):
    """DFloat11 (Huffman-coded exponents that a GPU kernel decodes) with `cpu_offload=True`: each
    layer's compressed tensors wait pinned in host RAM and are copied in before it runs. Packed by
    its own `compress_model`, loaded back into a fresh model with `DFloat11Model.from_pretrained(
    ..., bfloat16_model=, cpu_offload=True)`; embeddings, norms and head stay bf16 on the GPU."""
    from dfloat11 import DFloat11Model, compress_model

    weights = sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)
    need_s = weights * _df11_encode_s_per_weight(model)
    if need_s > spare_s:
        raise RuntimeError(f"dfloat11's encoder (a Python loop over every weight) would need ~{need_s:.0f} s "
                           f"for {weights / 1e9:.2f} G weights; {max(spare_s, 0):.0f} s of --budget-s to spare")
    with tempfile.TemporaryDirectory() as tmp:
        with _quiet():        # its progress bars and LUTs (dahuffman's code tables bypass this)
            compress_model(model, DF11_LAYERS, tmp, save_single_file=True, check_correctness=False)
        model.to("meta")              # on disk now: this copy must not count in the row's host RAM
        fresh = build_model(case.preset, layers=case.layers, device="cuda")
        model = DFloat11Model.from_pretrained(tmp, bfloat16_model=fresh, cpu_offload=True, device="cuda")
    m = measure_model(model, case, args, args.tokens, args.repeat)
    wire = sum(t.nbytes for mod in model.modules() for t in getattr(mod, "offloaded_tensors", {}).values())
    return m, args.tokens, wire, "layers compressed by dfloat11 (its own check off: the tokens check it)"


def _df11_encode_s_per_weight(model) -> float:
    """Seconds per weight of dfloat11's encoder, timed on 2^17 of the model's own weights."""
    from dfloat11.dfloat11_utils import encode_weights, get_32bit_codec, get_codec

    sample = next(model.model.layers[0].parameters()).detach().flatten()[: 1 << 17].cpu()
    t0 = time.perf_counter()
    with _quiet():
        codec, _, _ = get_32bit_codec(get_codec(sample)[1])
        encode_weights([sample], codec, 8, 512)
    return (time.perf_counter() - t0) / sample.numel()


@contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def bench_budget(run: Run, args) -> None:
    """The `bench budget` sweep on this GPU: minimum, middle, all resident (decode only)."""
    from .budget import budget_points, sweep

    model = build_model(args.preset, layers=args.layers, device="cuda")
    ids = prompt(model).cuda()
    with torch.no_grad():
        ref = greedy(model.generate, ids, args.slow_tokens)
    model.cpu()
    _free_gpu()
    cache = kv_growth_nbytes(model, ids, {"max_new_tokens": args.slow_tokens})
    sweep(model, ids, ref, "cuda", budget_points(model, "cuda", 2, 3, cache), 2, args.slow_tokens, 2,
          on_row=lambda r: run.add(r, table="gpu_budget"))


def bench_8b(run: Run, args) -> None:
    """llama-3-8b: resident, then streamed under `vram_budget="4GiB"` (16 tokens), with the
    activation reserve the resident run measured for the prefill (the first, traced call is a
    small one: measured there, the reserve would not cover the 4 x 1024 prefill)."""
    tokens = 16
    model = build_model(BIG, device="cuda")                        # 16 GB, initialised in seconds
    case = make_case(BIG, None, model, args)
    with run.section(BIG, "resident"):
        bench_resident(run, case, model, args, tokens, 2)
    model.cpu()
    _free_gpu()
    if case.res is None:
        return
    reserve = case.res["prefill_act"]
    method = f"vzstream prefetch=2 vram_budget=4GiB activation_reserve={reserve / GIB:.2f}GiB"
    with run.section(BIG, method):
        bench_vzstream(run, case, method, model, args, tokens, 2, prefetch=2, vram_budget="4GiB",
                       activation_reserve=reserve)
