"""Sizes and budgets: one parser (`config.parse_nbytes`) for what people type, every budget parsed
once into None, bytes or a share of the device (`parse_budget`), and turned into bytes with the
device's memory asked for only when it is a share (`resolve_budget`)."""

import numpy as np
import pytest

from vzstream.config import build_config, parse_budget, parse_nbytes, resolve_budget
from vzstream.errors import ConfigError

GiB, MiB, KiB, TiB = 2**30, 2**20, 2**10, 2**40

SIZES = [
    # K, M, G, T alone, with "i" or with "iB": powers of two, in any case
    ("6G", 6 * GiB), ("6GiB", 6 * GiB), ("6 GiB", 6 * GiB), ("6g", 6 * GiB), ("6gib", 6 * GiB), ("6GIB", 6 * GiB),
    ("6Gi", 6 * GiB), ("600M", 600 * MiB), ("64mib", 64 * MiB), ("512K", 512 * KiB), ("2T", 2 * TiB),
    ("1.5GiB", 3 * GiB // 2), ("1.5 KiB", 1536), (" 6 GiB ", 6 * GiB), (".5G", GiB // 2),
    # KB, MB, GB, TB: powers of ten
    ("6GB", 6 * 10**9), ("600MB", 600 * 10**6), ("6 kB", 6000), ("6kb", 6000), ("1TB", 10**12), ("500MB", 500 * 10**6),
    # bytes
    ("123", 123), ("123B", 123), ("123 b", 123), (123, 123), (0, 0), ("0", 0), (np.int64(5), 5),
    ("123456789012345678901", 123456789012345678901),     # exact: no float on the way
    # a fraction of a byte rounds down
    ("1.9B", 1), ("0.5B", 0), ("1.0000001KiB", 1024),
]


@pytest.mark.parametrize("value, nbytes", [pytest.param(v, n, id=repr(v)) for v, n in SIZES])
def test_size_is_parsed_to_exact_bytes(value, nbytes):
    got = parse_nbytes(value, "size")
    assert got == nbytes and type(got) is int


@pytest.mark.parametrize("value, nbytes", [pytest.param(v, n, id=repr(v)) for v, n in SIZES])
def test_session_options_take_the_same_sizes(value, nbytes):
    cfg = build_config({"vram_budget": value, "activation_reserve": value})
    assert cfg.vram_budget == nbytes and type(cfg.vram_budget) is int
    assert cfg.activation_reserve == nbytes and type(cfg.activation_reserve) is int


NOT_SIZES = [
    -1, "-6G", "-1", True, False, None, 1.5, 6e9, float("nan"), float("inf"), "inf", "nan", "", "   ",
    "G", "GiB", "6 parsecs", "6XB", "6 G B", "6GiBs", "0.5", "1e9", "6,5G", "6..5G", [1], b"6G",
]


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in NOT_SIZES])
def test_not_a_size_is_a_config_error_naming_the_option(value):
    with pytest.raises(ConfigError) as err:
        parse_nbytes(value, "activation_reserve")
    message = str(err.value)
    assert "`activation_reserve`" in message
    assert repr(value) in message                       # the value given
    assert "'6GiB'" in message                          # the fix
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in (-1, "-6G", "-0.5KiB")])
def test_negative_size_says_so(value):
    with pytest.raises(ConfigError, match=r"`reserve` must be >= 0 bytes"):
        parse_nbytes(value, "reserve")


def test_fraction_ok_points_to_a_float_share():
    with pytest.raises(ConfigError, match=r"float in \(0, 1\]"):
        parse_nbytes("half", "vram_budget", fraction_ok=True)
    with pytest.raises(ConfigError) as err:
        parse_nbytes("half", "activation_reserve")
    assert "float" not in str(err.value)


BUDGETS = [
    pytest.param(None, None, id="None"), pytest.param(4096, 4096, id="int"), pytest.param("6G", 6 * GiB, id="'6G'"),
    pytest.param(0.5, 0.5, id="0.5"), pytest.param(1.0, 1.0, id="1.0"), pytest.param(np.float32(0.25), 0.25, id="np.float32"),
    pytest.param(np.int64(7), 7, id="np.int64"),
]


@pytest.mark.parametrize("value, parsed", BUDGETS)
def test_budget_is_parsed_once_to_none_bytes_or_a_share(value, parsed):
    got = parse_budget(value)
    assert got == parsed and type(got) is type(parsed)
    assert build_config({"vram_budget": value}).vram_budget == parsed


NOT_SHARES = [0.0, -0.5, 1.5, 1.0000001, 6e9, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in NOT_SHARES])
def test_float_budget_outside_0_1_is_rejected_with_the_fix(value):
    for call in (lambda: parse_budget(value, "budget"), lambda: resolve_budget(value, _never, "budget"),
                 lambda: build_config({"vram_budget": value})):
        with pytest.raises(ConfigError, match=r"must be in \(0, 1\]") as err:
            call()
        message = str(err.value)
        assert "`budget`" in message or "`vram_budget`" in message
        assert repr(value) in message and "Pass e.g. 0.5" in message


def _never() -> int:
    raise AssertionError("total_memory() asked for a budget that is not a share")


class _Device:
    def __init__(self, nbytes):
        self.nbytes, self.calls = nbytes, 0

    def total_memory(self):
        self.calls += 1
        return self.nbytes


@pytest.mark.parametrize("value, nbytes", [
    pytest.param(None, None, id="None"), pytest.param(123, 123, id="int"), pytest.param("6GiB", 6 * GiB, id="'6GiB'"),
    pytest.param("6 GB", 6 * 10**9, id="'6 GB'"),
])
def test_resolve_budget_in_bytes_never_asks_the_device(value, nbytes):
    assert resolve_budget(value, _never) == nbytes


@pytest.mark.parametrize("share, total, nbytes", [
    pytest.param(0.5, 1000, 500, id="half"), pytest.param(1.0, 80 * GiB, 80 * GiB, id="whole"),
    pytest.param(1 / 3, 1000, 333, id="third_rounds_down"), pytest.param(np.float64(0.25), 4 * GiB, GiB, id="np.float64"),
])
def test_resolve_budget_share_asks_the_device_once(share, total, nbytes):
    device = _Device(total)
    got = resolve_budget(share, device.total_memory)
    assert got == nbytes and type(got) is int and device.calls == 1


def test_resolve_budget_takes_what_session_config_holds():
    device = _Device(1000)
    assert resolve_budget(build_config({"vram_budget": 0.75}).vram_budget, device.total_memory) == 750
    assert resolve_budget(build_config({"vram_budget": "1K"}).vram_budget, _never) == 1024


def test_resolve_budget_names_the_option():
    with pytest.raises(ConfigError, match="`budget`"):
        resolve_budget("lots", _never, "budget")
    with pytest.raises(ConfigError, match="`vram_budget`"):
        resolve_budget(True, _never)
