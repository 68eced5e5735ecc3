"""Codec names and zstd settings: what a wire image (`image.py`) codes its lane's top plane with.

- `Codec`: `SessionConfig.codec` ("zstd", "nibble", "auto"), `parse_codec` to read one,
  `CODINGS` for the two an image actually codes with.
- zstd levels: `check_level` and the one range [MIN_LEVEL, MAX_LEVEL] that config and packing share;
  `_FAST_PARAMS`, the match-finding-off parameters used when no level is given.
- `Frame`: one zstd frame of the top plane, `FRAME_NBYTES` elements at most (`decode.py` reads it
  back). Each frame records its content size and a checksum, so a flipped byte, a truncated
  frame or a frame of the wrong length is a `FormatError`, never wrong numbers.

The layout itself (chunks, planes, the nibble code's place in them) is `image.py`'s; docs/design.md,
"Codec", says why it is shaped so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import zstandard as zstd

from .errors import ConfigError

__all__ = ["Frame", "FRAME_NBYTES", "Codec", "CODECS", "CODINGS", "parse_codec", "check_level",
           "MIN_LEVEL", "MAX_LEVEL"]


class Codec(str, enum.Enum):
    """How a unit's lane is coded: `SessionConfig.codec`, `image.pack_image(coding=...)`. A str, so
    `Codec.ZSTD == "zstd"` and a plain string works wherever a Codec is expected."""

    ZSTD = "zstd"      # the least host RAM; host threads decode the frames
    NIBBLE = "nibble"  # the top plane as 4-bit codes the device expands; no host decode, more host RAM
    AUTO = "auto"      # a session's default: NIBBLE on CUDA, ZSTD on the CPU backend (`resolve`)

    def resolve(self, backend_name: str) -> "Codec":
        """AUTO for a backend: the GPU decodes on CUDA (the bus, not host threads, sets the pace);
        the CPU backend has no bus, so the least host RAM wins. Other codecs stay as they are."""
        if self is not Codec.AUTO:
            return self
        return Codec.NIBBLE if backend_name == "cuda" else Codec.ZSTD

    # Without these, f"{Codec.ZSTD}" is "Codec.ZSTD" on Python 3.11+ (no StrEnum on 3.10).
    __str__ = str.__str__
    __format__ = str.__format__


CODECS = tuple(c.value for c in Codec)
CODINGS = (Codec.ZSTD.value, Codec.NIBBLE.value)   # what an image codes with (AUTO resolves to one first)

# One range of zstd levels everywhere (packing, SessionConfig). zstd accepts down to -131072, but
# its fast modes barely shrink byte planes there: a bf16 top plane of N(0, 0.02) weights keeps
# 0.80 of its size at -7, 0.91 at -20 and 0.99 at -100, where the 5% rule stores it raw anyway.
MIN_LEVEL = -7
MAX_LEVEL = 22   # zstd.MAX_COMPRESSION_LEVEL

# Match finding off: these planes have no long repeats, so matching costs ratio *and* speed.
# window_log 17 keeps blocks at 128 KiB; smaller blocks decode ~4x slower (docs/design.md, "Codec").
_FAST_PARAMS = zstd.ZstdCompressionParameters.from_level(
    1, strategy=zstd.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6, search_log=1,
    min_match=7, write_content_size=True, write_checksum=True)

# Top-plane bytes (= elements) per frame. docs/design.md, "Codec" says ~1 MiB; 4 MiB decodes as fast on
# one thread and hands the GIL back a quarter as often per byte, which is what limits decode threads
# while the forward thread runs Python (docs/benchmarks.md, "decode threads and the GIL").
FRAME_NBYTES = 4 << 20


@dataclass(frozen=True)
class Frame:
    start: int  # offset of the frame's first byte within its plane (== first element index)
    nbytes: int  # decoded size in bytes
    data: Any  # buffer: one zstd frame with content size and checksum (a view into an arena)


def parse_codec(value: Any, name: str = "codec") -> Codec:
    """`"auto"` | `"zstd"` | `"nibble"` (or a Codec) -> the Codec; else ConfigError saying what each trades."""
    try:
        return Codec(value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"`{name}` must be one of {CODECS}; got {value!r}. \"zstd\" stores the least host RAM and "
            f"host threads decode it; \"nibble\" stores 4-bit codes that the device expands (more host RAM, "
            f"no host decode); \"auto\" (the default) is nibble on CUDA and zstd on the CPU.") from None


def check_level(level: Any) -> None:
    """`level` is None or an int zstd level in [MIN_LEVEL, MAX_LEVEL]; else ConfigError."""
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)
                              or not MIN_LEVEL <= level <= MAX_LEVEL):
        raise ConfigError(f"`level` must be None or an int zstd level in [{MIN_LEVEL}, {MAX_LEVEL}]; "
                          f"got {level!r}. Leave it None for the default (match finding off).")
