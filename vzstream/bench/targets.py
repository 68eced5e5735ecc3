"""The issue's GPU targets, read off the rows of `bench gpu` (vzstream/bench/gpu.py): for each, the
best vzstream row for it, what that row measured, and whether it meets the target."""

from __future__ import annotations

TARGET_COLUMNS = ["model", "target", "measured", "met"]


def targets(rows: list[dict], model: str) -> list[dict]:
    """The issue's targets, read off `model`'s rows: the best vzstream row for each (every one
    streams all blocks), what it measured, and whether that meets the target. A target whose
    baseline did not run says so instead of a verdict."""
    by = {r["method"]: r for r in rows if r.get("model") == model and "decode_tok_s" in r}
    ours = [r for m, r in by.items() if m.startswith("vzstream")]
    res, dif, acc = by.get("resident"), by.get("diffusers group offload"), by.get("accelerate cpu_offload")
    out = []

    def add(target, measured, met):
        out.append(dict(model=model, target=target, measured=measured, met=met))

    if not ours:
        add("any", "no vzstream row ran", "not measured")
        return out
    best = max(ours, key=lambda r: r["decode_bound_frac"])
    add("streamed decode >= 90% of the bound", f"{best['decode_bound_frac']:.2f} ({best['method']})",
        best["decode_bound_frac"] >= 0.9)
    if dif is None:
        add(">= diffusers' tokens/s at <= 0.75x its host RAM", "diffusers did not run", "not measured")
    else:
        lean = [r for r in ours if r["host_above_idle_gib"] <= 0.75 * dif["host_above_idle_gib"]]
        top = max(lean, key=lambda r: r["decode_tok_s"], default=None)
        measured = "no row within the RAM bound" if top is None else (
            f"{top['decode_tok_s']:.3g} vs {dif['decode_tok_s']:.3g} tok/s at "
            f"{top['host_above_idle_gib'] / dif['host_above_idle_gib']:.2f}x its host RAM ({top['method']})")
        add(">= diffusers' tokens/s at <= 0.75x its host RAM", measured,
            top is not None and top["decode_tok_s"] >= dif["decode_tok_s"])
    fastest = max(ours, key=lambda r: r["decode_tok_s"])
    if acc is None:
        add(">= 5x accelerate cpu_offload", "accelerate did not run", "not measured")
    else:
        ratio = fastest["decode_tok_s"] / acc["decode_tok_s"]
        add(">= 5x accelerate cpu_offload", f"{ratio:.2f}x ({fastest['method']})", ratio >= 5)
    prefill = max(ours, key=lambda r: r["prefill_tok_s"])
    if res is not None:
        slower = res["prefill_tok_s"] / prefill["prefill_tok_s"]
        add("prefill <= 1.10x resident time", f"{slower:.2f}x ({prefill['method']})", slower <= 1.10)
    equal = [r["tokens_equal"] for r in by.values() if "tokens_equal" in r]
    failed = [r["method"] for r in rows if r.get("model") == model and str(r.get("note", "")).startswith("failed")]
    add("bit-exact tokens everywhere", f"{sum(equal)} of {len(equal)} rows"
        + (f"; failed, not measured: {', '.join(failed)}" if failed else ""), all(equal) and not failed)
    return out
