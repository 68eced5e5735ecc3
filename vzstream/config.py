"""SessionConfig: every option of `vzstream.session`, validated before anything is allocated.

`session(model, **options)` builds one frozen `SessionConfig`; an unknown option or a bad value
raises `ConfigError` naming the option, the constraint, the value given and the fix. Options are
parsed once, here, into typed fields: `codec` is a `Codec`, sizes are ints of bytes, and
`vram_budget` is None, an int of bytes or a float share of the device's memory in (0, 1], which
`resolve_budget` turns into bytes once the device is known. Nothing here touches CUDA:
`device="auto"` is resolved by the backend factory.

Sizes (`parse_nbytes`): an int is bytes; a string is a number and an optional unit, in any case,
spaces allowed. K, M, G, T, alone or with "i"/"iB", are powers of two ("6G" == "6GiB" ==
6 * 2**30, what people mean by a GPU's or a host's memory); KB, MB, GB, TB are powers of ten
("6GB" == 6 * 10**9); "B" or no unit is bytes. A fraction of a byte rounds down.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from .codec import Codec, check_level, parse_codec
from .tune import AUTO_DEPTHS, auto_workers
from .errors import ConfigError

_UNITS_MODES = ("blocks", "leaves")
_CACHE_MODES = ("pass", "none")
_VERIFY_MODES = ("exit", "stream")

# Bare K/M/G/T are binary: "6G" of GPU or host memory means 6 GiB to nearly everyone who types it.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mi": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "ti": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"\s*([-+]?)([0-9]+\.?[0-9]*|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """One decode thread per core, leaving one core to the forward thread (at most 32).

    Decode threads scale with cores: on a 16-core Xeon host of an H100 one thread decodes
    2.5 GB/s of bf16 and 15 decode 26-28 GB/s (docs/benchmarks.md), still under PCIe's ~55."""
    return max(1, min(32, available_cores() - 1))


def parse_nbytes(value: Any, name: str, fraction_ok: bool = False) -> int:
    """A size (the rule is in the module docstring) -> bytes, else ConfigError naming `name`.

    `fraction_ok`: `name` also takes a float share of device memory, which the caller handles
    (`parse_budget`); here it only makes the error say so."""
    nbytes = _nbytes_or_none(value)
    if nbytes is None:
        raise ConfigError(
            f"`{name}` must be a size: an int of bytes, or a string such as '6GiB' or '6G' (6 * 2**30), "
            f"'6GB' (6 * 10**9), '512 MiB' or '123B' (units K, M, G, T, KiB...TiB, KB...TB, B; any case); "
            f"got {value!r}. Pass e.g. '6GiB'."
            + (" For a share of the device's memory pass a float in (0, 1], e.g. 0.5." if fraction_ok else ""))
    if nbytes < 0:
        raise ConfigError(f"`{name}` must be >= 0 bytes; got {value!r}. Pass a size such as '6GiB'.")
    return nbytes


def _nbytes_or_none(value: Any) -> int | None:
    """Bytes (possibly negative) that `value` spells, or None if it spells no size."""
    if isinstance(value, bool):          # True is an int, but never meant as 1 byte
        return None
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if not m or m.group(3).lower() not in _SIZE_UNITS:
            return None
        sign, number, unit = m.group(1), m.group(2), m.group(3).lower()
        if not unit and not number.isdigit():   # a bare "0.5": bytes or a share? Neither, say so.
            return None
        # Fraction, not float: "123456789012345678901" stays exact; int() rounds down.
        nbytes = int(Fraction(number) * _SIZE_UNITS[unit])
        return -nbytes if sign == "-" else nbytes
    try:
        return operator.index(value)     # ints, numpy integers; not floats
    except TypeError:
        return None


def parse_budget(value: Any, name: str = "vram_budget") -> int | float | None:
    """None | a size | a float share of the device's memory in (0, 1] -> None | bytes | the share.

    An int is bytes and a float is a share, so 1 and 1.0 differ: 1.0 is the whole device."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):   # numpy floats too
        if not 0.0 < value <= 1.0:       # also false for nan
            raise ConfigError(
                f"`{name}` as a float is a share of the device's memory and must be in (0, 1]; "
                f"got {value!r}. Pass e.g. 0.5, or a size such as '6GiB' or an int of bytes.")
        return float(value)
    return parse_nbytes(value, name, fraction_ok=True)


def resolve_budget(value: Any, total_memory: Callable[[], int], name: str = "vram_budget") -> int | None:
    """A budget, as `SessionConfig` holds it or as typed -> bytes, or None for no budget.

    `total_memory()` (the device's bytes) is called only for a share, so a budget in bytes
    never has to ask the device."""
    budget = parse_budget(value, name)
    if isinstance(budget, float):
        return int(budget * total_memory())
    return budget


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
    prefetch: Any = 2               # fetches in flight ahead of the unit computing; 0 = synchronous; "auto"
    workers: Any = None             # decode threads; None = default_workers(); "auto": tried on the first passes
    gil_switch_interval: Any = 1e-4  # seconds; sys.setswitchinterval during streamed calls; None = leave it
    units: Any = "blocks"           # "blocks" | "leaves" | list of module fqns
    cache: str = "pass"             # "pass": a unit used twice in a pass is fetched once; "none"
    level: int | None = None        # zstd level; None = match finding off (docs/design.md, "Codec")
    codec: Codec = Codec.AUTO       # "auto": nibble on CUDA, zstd on CPU; "zstd": host threads decode;
                                    # "nibble": 4-bit codes the device expands
    verify: str = "exit"            # "exit": crc32 of each tensor when restored; "stream": also of each unit at every fetch
    raw_fraction: Any = 0.0         # share of streamed bytes kept uncompressed (no decode, more host RAM); "auto"
    vram_budget: Any = None         # bytes | "6GiB" | share of device memory in (0, 1]; None, int or float after
    activation_reserve: Any = None  # bytes kept free for activations under a budget; None = measured (CUDA) or 0
    pool: Any = None                # a DevicePool shared by several sessions
    backend: Any = None             # a Backend instance (tests: FakeBackend); overrides `device`
    weights: Any = None             # a packed file (`vzstream.save`) to open a meta-device model from
    materialize: bool = False       # with `weights`: keep the weights (on the CPU) after the session

    def __post_init__(self) -> None:
        self._check_device()
        self._check_ints()
        self._check_units()
        object.__setattr__(self, "codec", parse_codec(self.codec, "codec"))
        if self.cache not in _CACHE_MODES:
            raise ConfigError(f"`cache` must be one of {_CACHE_MODES}; got {self.cache!r}.")
        if self.verify not in _VERIFY_MODES:
            raise ConfigError(f"`verify` must be one of {_VERIFY_MODES}; got {self.verify!r}. \"exit\" (the default) "
                              f"checks each tensor when the session gives it back; \"stream\" also checks each "
                              f"unit's stored bytes at every fetch, before its upload.")
        object.__setattr__(self, "vram_budget", parse_budget(self.vram_budget, "vram_budget"))
        if self.activation_reserve is not None:
            object.__setattr__(self, "activation_reserve", parse_nbytes(self.activation_reserve, "activation_reserve"))
        self._check_switch_interval()
        self._check_raw_fraction()
        self._check_weights()

    def _check_weights(self) -> None:
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise ConfigError(f"`weights` must be the path of a packed model (`vzstream.save` wrote it) or None; "
                              f"got {type(self.weights).__name__}.")
        if not isinstance(self.materialize, bool) or (self.materialize and self.weights is None):
            raise ConfigError(f"`materialize` must be a bool, and True only with `weights` (it keeps the weights read "
                              f"from the file after the session); got {self.materialize!r} with weights={self.weights!r}.")

    @property
    def max_workers(self) -> int:
        """The decode threads to start with: `workers`, or the most "auto" tries."""
        return auto_workers(available_cores())[-1] if self.workers == "auto" else self.workers

    @property
    def max_prefetch(self) -> int:
        """The depth the slots are sized for: `prefetch`, or the deepest "auto" tries."""
        return AUTO_DEPTHS[-1] if self.prefetch == "auto" else self.prefetch

    def _check_device(self) -> None:
        object.__setattr__(self, "device", check_device(self.device))

    def _check_ints(self) -> None:
        for name in ("prefetch", "workers", "level"):     # numpy integers count as ints
            value = getattr(self, name)
            if value is not None and not isinstance(value, (bool, int)) and hasattr(value, "__index__"):
                object.__setattr__(self, name, operator.index(value))
        if self.prefetch != "auto" and (isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int)
                                        or not 0 <= self.prefetch <= 64):
            raise ConfigError(
                f"`prefetch` must be an int in [0, 64] (units decoded ahead of the one computing; "
                f"0 = fetch synchronously) or \"auto\" (tried on the first passes); got {self.prefetch!r}. "
                f"Try prefetch=2."
            )
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers())
        elif self.workers != "auto" and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or not 1 <= self.workers <= 256):
            raise ConfigError(
                f"`workers` must be an int in [1, 256] (decode threads) or \"auto\" (tried on the first passes); "
                f"got {self.workers!r}. Leave it unset for {default_workers()} on this machine."
            )
        check_level(self.level)           # the range pack() accepts: codec.MIN_LEVEL..MAX_LEVEL

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
