"""SessionConfig: every option of `vzstream.session`, validated before anything is allocated.

`session(model, **options)` builds one frozen `SessionConfig`; an unknown option or a bad value
raises `ConfigError` naming the option, the constraint, the value given and the fix. Nothing
here touches CUDA: `device="auto"` is resolved by the backend factory.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from dataclasses import dataclass
from typing import Any

from .codec import CODINGS as _CODECS
from .errors import ConfigError

_UNITS_MODES = ("blocks", "leaves")
_CACHE_MODES = ("pass", "none")
_SIZE_SUFFIXES = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """One decode thread per core, leaving one core to the forward thread (at most 32).

    Decode threads scale with cores: on a 16-core Xeon host of an H100 one thread decodes
    2.5 GB/s of bf16 and 15 decode 26-28 GB/s (docs/benchmarks.md), still under PCIe's ~55."""
    return max(1, min(32, available_cores() - 1))


def parse_nbytes(value: Any, name: str, fraction_ok: bool = False) -> int:
    """`"6GiB"`, `"500MB"`, `1024` -> bytes. Fractions are the caller's business."""
    if isinstance(value, bool):
        raise ConfigError(f"`{name}` must be a byte count like 6442450944 or '6GiB'; got {value!r}.")
    if not isinstance(value, (str, float)):
        try:
            value = operator.index(value)     # ints, numpy integers
        except TypeError:
            pass
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"`{name}` must be >= 0 bytes; got {value}. Pass a positive size such as '6GiB'.")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        # A bare "0.5" is ambiguous (bytes? a fraction?): a unitless string must be whole bytes.
        if m and m.group(2).lower() in _SIZE_SUFFIXES and (m.group(2) or m.group(1).isdigit()):
            return int(float(m.group(1)) * _SIZE_SUFFIXES[m.group(2).lower()])
    raise ConfigError(
        f"`{name}` must be a byte count (int) or a size string such as '6GiB' or '500MB' "
        f"(suffixes: {', '.join(s for s in _SIZE_SUFFIXES if s)}); got {value!r}."
        + (" For a fraction of the device's memory pass a float, e.g. 0.5." if fraction_ok else "")
    )


def check_device(device: Any) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> the string; else ConfigError."""
    if type(device).__name__ == "device":                # torch.device, e.g. model.device
        device = str(device)
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}.")
    return device


@dataclass(frozen=True)
class SessionConfig:
    """Options of a streaming session. See README "Options" for what each one trades."""

    device: str = "auto"            # "auto" = "cuda" when available, else "cpu"
    prefetch: int = 2               # fetches in flight ahead of the unit computing; 0 = synchronous
    workers: int | None = None      # decode threads; None = default_workers()
    gil_switch_interval: Any = 1e-4  # seconds; sys.setswitchinterval during streamed calls; None = leave it
    units: Any = "blocks"           # "blocks" | "leaves" | list of module fqns
    cache: str = "pass"             # "pass": a unit used twice in a pass is fetched once; "none"
    level: int | None = None        # zstd level; None = DESIGN §3's match-finding-off parameters
    codec: str = "zstd"             # "zstd": decoded by host threads; "nibble": 4-bit codes the device expands
    raw_fraction: Any = 0.0         # share of streamed bytes kept uncompressed (no decode, more host RAM); "auto"
    vram_budget: Any = None         # bytes | "6GiB" | fraction of device memory in (0, 1]
    activation_reserve: Any = None  # bytes kept free for activations under a budget; None = measured (CUDA) or 0
    pool: Any = None                # a DevicePool shared by several sessions
    backend: Any = None             # a Backend instance (tests: FakeBackend); overrides `device`

    def __post_init__(self) -> None:
        self._check_device()
        self._check_ints()
        self._check_units()
        if self.codec not in _CODECS:
            raise ConfigError(
                f"`codec` must be one of {_CODECS}; got {self.codec!r}. \"zstd\" stores the least host RAM and "
                f"decodes on host threads; \"nibble\" stores more, and the GPU decodes it (no host decode).")
        if self.cache not in _CACHE_MODES:
            raise ConfigError(f"`cache` must be one of {_CACHE_MODES}; got {self.cache!r}.")
        if self.vram_budget is not None and not isinstance(self.vram_budget, float):
            object.__setattr__(self, "vram_budget", parse_nbytes(self.vram_budget, "vram_budget", fraction_ok=True))
        if isinstance(self.vram_budget, float) and not 0.0 < self.vram_budget <= 1.0:
            raise ConfigError(
                f"`vram_budget` as a float is a fraction of the device's memory and must be in (0, 1]; "
                f"got {self.vram_budget}. Pass e.g. 0.5, or a size such as '6GiB'."
            )
        if self.activation_reserve is not None:
            object.__setattr__(self, "activation_reserve", parse_nbytes(self.activation_reserve, "activation_reserve"))
        self._check_switch_interval()
        self._check_raw_fraction()

    def _check_device(self) -> None:
        object.__setattr__(self, "device", check_device(self.device))

    def _check_ints(self) -> None:
        for name in ("prefetch", "workers", "level"):     # numpy integers count as ints
            value = getattr(self, name)
            if value is not None and not isinstance(value, (bool, int)) and hasattr(value, "__index__"):
                object.__setattr__(self, name, operator.index(value))
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or not 0 <= self.prefetch <= 64:
            raise ConfigError(
                f"`prefetch` must be an int in [0, 64] (units decoded ahead of the one computing; "
                f"0 = fetch synchronously); got {self.prefetch!r}. Try prefetch=2."
            )
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers())
        elif isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= 256:
            raise ConfigError(
                f"`workers` must be an int in [1, 256] (decode threads); got {self.workers!r}. "
                f"Leave it unset for {default_workers()} on this machine."
            )
        if self.level is not None and (isinstance(self.level, bool) or not isinstance(self.level, int)
                                       or not -7 <= self.level <= 22):
            raise ConfigError(f"`level` must be None or a zstd level in [-7, 22]; got {self.level!r}. Leave it None.")

    def _check_switch_interval(self) -> None:
        value = self.gil_switch_interval
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1e-6 <= value <= 1:
            raise ConfigError(
                f"`gil_switch_interval` must be None or seconds in [1e-6, 1] (the GIL switch interval while a "
                f"streamed call runs); got {value!r}. Leave it at 1e-4, or None to keep sys.getswitchinterval()."
            )
        object.__setattr__(self, "gil_switch_interval", float(value))

    def _check_raw_fraction(self) -> None:
        value = self.raw_fraction
        if isinstance(value, str) and value == "auto":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(
                f"`raw_fraction` must be a number in [0, 1] (the share of streamed bytes kept uncompressed) "
                f"or \"auto\"; got {value!r}. Use 0 for the least host RAM, or \"auto\" to measure this "
                f"machine's decode and upload rates at open and keep raw what the decode cannot keep up with."
            )
        object.__setattr__(self, "raw_fraction", float(value))

    def _check_units(self) -> None:
        units = self.units
        if isinstance(units, str):
            if units not in _UNITS_MODES:
                raise ConfigError(
                    f"`units` must be 'blocks', 'leaves' or a list of module names; got {units!r}."
                )
            return
        if isinstance(units, (list, tuple)) and units and all(isinstance(u, str) for u in units):
            object.__setattr__(self, "units", tuple(units))
            return
        raise ConfigError(
            f"`units` must be 'blocks', 'leaves' or a non-empty list of module names (str); got {units!r}."
        )


def build_config(options: dict[str, Any]) -> SessionConfig:
    """`session(model, **options)` -> SessionConfig, rejecting unknown option names."""
    valid = [f.name for f in dataclasses.fields(SessionConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(f'`{u}`' for u in unknown)} for vzstream.session; "
            f"valid options are: {', '.join(valid)}."
        )
    return SessionConfig(**options)
