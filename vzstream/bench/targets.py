"""The issue's targets for `bench gpu` (vzstream/bench/gpu.py), read off its rows: PASS or FAIL with
what was measured, or NOT MEASURED with why (the row for it was skipped, failed or never reached).
`python -m vzstream.bench.targets OUT` reads them off the rows a run cut short left in OUT."""

from __future__ import annotations

import json
import os
import sys

# The baselines' row labels: the targets find the rows by them.
DIFFUSERS_FAIR = "diffusers group offload, fair (layers only, record_stream)"
DIFFUSERS_TODAY = "diffusers group offload, as configured today"
ACCELERATE = "accelerate cpu_offload"
DFLOAT11 = "dfloat11 cpu_offload"
BIG = "llama-3-8b"
TARGET_COLUMNS = ["target", "verdict", "detail"]


class NotMeasured(Exception):
    """A target's input row did not run; the message says why."""


def model_label(preset: str, layers: int | None) -> str:
    return preset if layers is None else f"{preset} ({layers} layers)"


def measured(rows: list[dict], model: str, prefix: str) -> list[dict]:
    """`model`'s measured rows whose method starts with `prefix`, or NotMeasured quoting the note
    of each row that stands in for them (skipped, failed, or the model's time-budget skip "-")."""
    mine = [r for r in rows if r.get("model") == model and (r["method"].startswith(prefix) or r["method"] == "-")]
    found = [r for r in mine if "decode_tok_s" in r]
    if found:
        return found
    raise NotMeasured("; ".join(f"{r['method']}: {r.get('note', '')}" for r in mine)
                      or f"no {prefix} row for {model}: not run, or not reached")


def verdicts(rows: list[dict], model: str, prefill: tuple = (4, 1024)) -> list[dict]:
    """One verdict per target of the issue, read off `model`'s rows (and llama-3-8b's). Each
    vzstream row of `model` streams every decoder block; a target takes the best one for it."""
    out = []

    def check(target: str, judge) -> None:
        try:
            ok, detail = judge()
        except NotMeasured as exc:
            out.append(dict(target=target, verdict="NOT MEASURED", detail=str(exc)))
        else:
            out.append(dict(target=target, verdict="PASS" if ok else "FAIL", detail=detail))

    def ours(key: str) -> dict:
        return max(measured(rows, model, "vzstream"), key=lambda r: r[key])

    def wire():
        r = ours("decode_wire_frac")
        return r["decode_wire_frac"] >= 0.9, f"{r['decode_wire_frac']:.0%}, {r['method']}"

    def faster(method: str, factor: float):
        def judge():
            r, base = ours("decode_tok_s"), measured(rows, model, method)[0]
            x = r["decode_tok_s"] / base["decode_tok_s"]
            return x >= factor, f"{x:.2f}x: {r['decode_tok_s']:.3g} vs {base['decode_tok_s']:.3g} tok/s, {r['method']}"
        return judge

    def big():
        r = max(measured(rows, BIG, "vzstream"), key=lambda r: r["decode_tok_s"])
        ok = r["decode_tok_s"] >= 4.5 and r["peak_vram_gib"] <= 4
        return ok, f"{r['decode_tok_s']:.2f} tok/s, peak VRAM {r['peak_vram_gib']:.2f} GiB"

    def prefill_time():
        r, res = ours("prefill_tok_s"), measured(rows, model, "resident")[0]
        x = res["prefill_tok_s"] / r["prefill_tok_s"]
        return x <= 1.10, f"{x:.2f}x, {r['method']}"

    def ram():   # the fastest row: the one that beats diffusers on time must also use less RAM
        r, base = ours("decode_tok_s"), measured(rows, model, DIFFUSERS_FAIR)[0]
        if base["host_above_idle_gib"] <= 0:
            raise NotMeasured(f"{DIFFUSERS_FAIR}: host RAM above idle {base['host_above_idle_gib']:.2f} GiB")
        x = r["host_above_idle_gib"] / base["host_above_idle_gib"]
        return x <= 0.8, (f"{x:.2f}x: {r['host_above_idle_gib']:.2f} vs {base['host_above_idle_gib']:.2f} GiB "
                          f"above idle, {r['method']}")

    check(f"{model} streamed decode >= 90% of wire bound", wire)
    check(f"{model} >= 2x diffusers as configured today", faster(DIFFUSERS_TODAY, 2))
    check(f"{model} >= 1.25x fair diffusers", faster(DIFFUSERS_FAIR, 1.25))
    check(f"{model} >= 10x accelerate", faster(ACCELERATE, 10))
    check(f"{BIG} under 4 GiB >= 4.5 tok/s", big)
    check(f"{model} {prefill[0]}x{prefill[1]} prefill streamed <= 1.10x resident time", prefill_time)
    check(f"{model} host RAM <= 0.8x fair diffusers", ram)
    check("bit-exact tokens in every row", lambda: exact(rows))
    return out


def exact(rows: list[dict]):
    """Tokens equal in every row that compared them; a row that failed proves nothing either way."""
    done = [r for r in rows if "tokens_equal" in r]
    wrong = [f"{r['model']} {r['method']}" for r in done if r["tokens_equal"] is False]
    failed = [f"{r['model']} {r['method']}" for r in rows if str(r.get("note", "")).startswith("failed")]
    if wrong:
        return False, "tokens differ: " + ", ".join(wrong)
    if failed:
        raise NotMeasured("failed before comparing tokens: " + ", ".join(failed))
    if not done:
        raise NotMeasured("no row ran")
    return True, f"{len(done)} of {len(done)} rows"


def verdict_lines(found: list[dict]) -> list[str]:
    return [f"VERDICT {v['target']}: {v['verdict']} ({v['detail']})" for v in found]


def main(argv: list[str] | None = None) -> int:
    """The verdicts of a `bench gpu` run killed before its end, from `OUT/gpu.rows.jsonl` (written
    as each row was measured) and `OUT/gpu.config.json`: a row never reached is NOT MEASURED."""
    out = (sys.argv[1:] if argv is None else argv)[0]
    with open(os.path.join(out, "gpu.config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "gpu.rows.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    found = verdicts(rows, model_label(config["preset"], config.get("layers")), tuple(config["prefill"]))
    print("\n".join(verdict_lines(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
