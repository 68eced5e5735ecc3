"""`draw_timeline`: a session's last passes as a picture (`s.timeline(path)`), from the spans
`Timing` keeps (`timing.py`).

Lanes, top to bottom: one per decode worker ("forward" when small units decode inline at their
bind), the copy lane (CUDA; the fake backend's uploads), the expansion lane (CUDA), and the
compute lane: each streamed unit from bind to release over a grey band for the whole forward,
with the stalls before binds hatched, red while the unit was decoding, blue while it uploaded.
A unit keeps its colour in every lane, so one can be followed from decode to compute; a dashed
line starts each pass.

matplotlib is an optional extra (`pip install vzstream[plot]`), imported here only, when
drawing. The figure is drawn on an Agg canvas of its own: a user's pyplot state (backend, open
figures) is left alone.
"""

from __future__ import annotations

import re

from .errors import MissingDependencyError, TraceError

LANE_H = 0.8          # box height, in lanes
STALL = {"decode": "#d62728", "upload": "#1f4e9c"}     # by cause; a small unit decoded inline is decode's
FORWARD = "#e6e6e6"


def draw_timeline(timing, path: str, passes: int = 2, title: str = "") -> None:
    """Draw the last `passes` passes `timing` closed into the image file `path` (PNG, or any
    format matplotlib infers from the name)."""
    figure_cls, canvas_cls = _matplotlib()
    start, end, shown = timing.window(passes)
    if not shown:
        raise TraceError("no pass has been timed yet: run the model through the session (twice: the first pass "
                         "traces, and on CUDA a pass's device times arrive when the next one ends) before `timeline`.")
    spans = [s for s in list(timing.spans) if s[4] > start and s[3] < end]
    lanes = _lanes(spans)
    colours = _colours(spans)
    fig = figure_cls(figsize=(14, 1.3 + 0.42 * len(lanes)), dpi=110)
    canvas_cls(fig)
    ax = fig.add_subplot(1, 1, 1)
    ms = lambda t: (t - start) * 1e3           # noqa: E731 (the x axis: ms from the window's start)
    for row, (label, kinds, lane) in enumerate(lanes):
        y = len(lanes) - 1 - row
        if label == "compute":
            ax.broken_barh([(ms(a), ms(b) - ms(a)) for _, a, b, _ in shown], (y - 0.5, 1.0), color=FORWARD, lw=0)
        _boxes(ax, [s for s in spans if s[0] in kinds and (lane is None or s[1] == lane)], y, ms, colours, ms(end))
        if label == "compute":
            _stalls(ax, spans, y, ms)
    for number, a, _, _ in shown:
        ax.axvline(ms(a), color="#555555", ls="--", lw=0.8)
        ax.text(ms(a), len(lanes) - 0.45, f" pass {number}", va="bottom", ha="left", fontsize=8, color="#555555")
    ax.set_yticks(range(len(lanes)), [label for label, _, _ in reversed(lanes)])
    ax.set_ylim(-0.6, len(lanes) - 0.1)
    ax.set_xlim(0, ms(end))
    ax.set_xlabel("ms", loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(_title(shown, title), fontsize=10, loc="left")
    _legend(ax)
    fig.savefig(path, bbox_inches="tight")


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "`timeline` draws with matplotlib, which is not installed: `pip install vzstream[plot]` "
            "(or `pip install matplotlib`).") from exc
    return Figure, FigureCanvasAgg


def _lanes(spans: list) -> list[tuple[str, tuple, str | None]]:
    """(label, span kinds, lane or None: any) of each lane shown, top to bottom."""
    workers = sorted({s[1] for s in spans if s[0] == "decode"}, key=_natural)
    lanes = [(_worker_label(w, i), ("decode",), w) for i, w in enumerate(w for w in workers if w != "forward")]
    if "forward" in workers:
        lanes.append(("decode (forward)", ("decode",), "forward"))
    kinds = {s[0] for s in spans}
    if "copy" in kinds:
        lanes.append(("copy", ("copy",), None))
    elif "upload" in kinds:                     # timed on the host (none: the CPU backend's cost nothing)
        lanes.append(("upload", ("upload",), None))
    if "expand" in kinds:
        lanes.append(("expand", ("expand",), None))
    lanes.append(("compute", ("compute",), None))
    return lanes


def _worker_label(name: str, i: int) -> str:
    return f"decode {name.rsplit('_', 1)[-1]}" if name.startswith("vzstream-decode_") else f"decode {i}"


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _colours(spans: list) -> dict:
    """fqn -> colour, in the units' natural order (`layers.2` before `layers.10`), so units next
    to each other get different hues: tab20's ten strong entries, then its ten light ones."""
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {fqn: palette(order[i % 20]) for i, fqn in enumerate(sorted({s[2] for s in spans}, key=_natural))}


def _boxes(ax, spans: list, y: float, ms, colours: dict, width_ms: float) -> None:
    """One box a span, labelled with its unit's short name where the box is wide enough."""
    for _, _, fqn, a, b in spans:
        x, w = ms(a), max(ms(b) - ms(a), width_ms / 1500)      # at least a pixel wide
        ax.broken_barh([(x, w)], (y - LANE_H / 2, LANE_H), color=colours.get(fqn, "#999999"), lw=0.3, edgecolor="white")
        name = _short(fqn)
        if w > 0.008 * width_ms * len(name) and x >= 0:    # at 14 inches, ~150 characters of 7 pt across
            ax.text(x + w / 2, y, name, ha="center", va="center", fontsize=7, clip_on=True)


def _stalls(ax, spans: list, y: float, ms) -> None:
    """The stalls, hatched in their cause's colour; touching ones of a cause drawn as one box."""
    for cause, colour in STALL.items():
        merged: list = []
        for a, b in sorted((s[3], s[4]) for s in spans if s[0] == "stall" and (s[1] == "upload") == (cause == "upload")):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        ax.broken_barh([(ms(a), ms(b) - ms(a)) for a, b in merged], (y - LANE_H / 2, LANE_H), facecolor="none",
                       edgecolor=colour, hatch="////", lw=0.8)


def _short(fqn: str) -> str:
    """`model.layers.12` -> `12`; `encoder.norm` -> `norm`."""
    return fqn.rsplit(".", 1)[-1] or fqn


def _title(shown: list, title: str) -> str:
    figures = shown[0][3]
    for _, _, _, p in shown[1:]:
        figures = figures + p
    first, last = shown[0][0], shown[-1][0]
    what = f"pass {first}" if first == last else f"passes {first}-{last}"
    return (f"{title + ': ' if title else ''}{what}: forward {figures.wall_s * 1e3:.1f} ms, stalled "
            f"{figures.stall_s * 1e3:.1f} ms ({100 * figures.stall_fraction:.1f}%), "
            f"{100 * figures.overlap:.0f}% of decode and upload hidden behind compute")


def _legend(ax) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=FORWARD, label="forward pass (resident units, the rest)"),
                       *(Patch(facecolor="none", edgecolor=colour, hatch="////", label=f"stall: waiting for its {cause}")
                         for cause, colour in STALL.items())],
              loc="upper right", bbox_to_anchor=(1.0, -0.1), fontsize=8, frameon=False, ncol=3)
