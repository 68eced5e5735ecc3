"""SessionConfig: every bad option is a ConfigError naming it; unknown options list the valid
ones; CUDA without a GPU is BackendUnavailableError; a rejected session leaves the model as it was."""

import dataclasses
import os

import pytest
import torch
from models import Stack, TinyLM, build, stack_with_reference

import vzstream
from vzstream import codec, image
from vzstream.codec import CODECS, Codec
from vzstream.decode import decode
from vzstream.config import SessionConfig, build_config, default_workers

BAD_OPTIONS = [
    ("prefetch", -1), ("prefetch", 65), ("prefetch", 2.0), ("prefetch", True), ("prefetch", "2"), ("prefetch", None),
    ("workers", 0), ("workers", 257), ("workers", 1.5), ("workers", False),
    ("units", "layers"), ("units", []), ("units", ["blocks.0", 1]), ("units", 3), ("units", None),
    ("cache", "all"), ("cache", None), ("cache", True), ("verify", "always"), ("verify", None),
    ("level", 23), ("level", -8), ("level", 1.0), ("level", True),
    ("device", "gpu"), ("device", "cuda:x"), ("device", "cuda:"), ("device", 0), ("device", None),
    ("vram_budget", "lots"), ("vram_budget", -1), ("vram_budget", 0.0), ("vram_budget", 1.5),
    ("vram_budget", "6 parsecs"), ("vram_budget", True), ("vram_budget", [1]),
    ("activation_reserve", "much"), ("activation_reserve", -5),
    ("gil_switch_interval", 0), ("gil_switch_interval", -1e-4), ("gil_switch_interval", 2.0), ("gil_switch_interval", 5e-7),
    ("gil_switch_interval", "1ms"), ("gil_switch_interval", True),
    ("raw_fraction", -0.1), ("raw_fraction", 1.5), ("raw_fraction", "fast"), ("raw_fraction", True),
    ("raw_fraction", None), ("codec", "lz4"), ("codec", None),
]


@pytest.mark.parametrize("name, value", [pytest.param(n, v, id=f"{n}={v!r}") for n, v in BAD_OPTIONS])
def test_bad_option_is_a_config_error_naming_it(name, value, snapshot):
    model = build(Stack)
    snap = snapshot(model)
    with pytest.raises(vzstream.ConfigError) as err:
        vzstream.session(model, **{name: value})
    message = str(err.value)
    assert f"`{name}`" in message
    assert repr(value) in message or str(value) in message     # the value given
    assert isinstance(err.value, ValueError) and isinstance(err.value, vzstream.VzstreamError)
    snap.check(model)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(vzstream.ConfigError, match="`prefech`") as err:
        vzstream.session(build(Stack), prefech=2)
    valid = [f.name for f in dataclasses.fields(SessionConfig)]
    for name in valid:
        assert name in str(err.value)
    assert {"prefetch", "workers", "units", "cache", "level", "device", "vram_budget"} <= set(valid)


@pytest.mark.parametrize("value, nbytes", [
    ("6GiB", 6 * 2**30), ("500MB", 500 * 10**6), ("1.5 KiB", 1536), ("64mib", 64 * 2**20), (1024, 1024),
])
def test_vram_budget_sizes_are_parsed_to_bytes(value, nbytes):
    assert build_config({"vram_budget": value}).vram_budget == nbytes


def test_valid_config_is_frozen_and_normalised():
    cfg = build_config({"units": ["blocks.0", "blocks.1"], "vram_budget": 0.5})
    assert cfg.units == ("blocks.0", "blocks.1")
    assert cfg.vram_budget == 0.5                     # a fraction of the device's memory
    assert cfg.workers == default_workers() >= 1
    assert (cfg.device, cfg.prefetch, cfg.cache) == ("auto", 2, "pass")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prefetch = 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_backend_unavailable(device, snapshot, open_models):
    model = build(Stack)
    snap = snapshot(model)
    s = vzstream.session(model, device=device)
    with pytest.raises(vzstream.BackendUnavailableError, match="`device`"):
        with s:
            pass
    assert isinstance(vzstream.BackendUnavailableError("x"), RuntimeError)
    snap.check(model)
    assert model not in open_models
    assert not torch.cuda.is_initialized()


# Rejected when the session opens (they need the model or the device), before anything is
# allocated: the model is untouched and free for the next session.
OPEN_ERRORS = [
    pytest.param({"units": ["blocks.9"]}, vzstream.ConfigError, "blocks.9", id="unknown_unit_fqn"),
    pytest.param({"units": ["blocks", "blocks.1"]}, vzstream.ConfigError, "blocks.1", id="nested_unit_fqns"),
    pytest.param({"vram_budget": 1}, vzstream.ConfigError, "`vram_budget`", id="budget_too_small"),
    pytest.param({"pool": "shared"}, vzstream.ConfigError, "`pool`", id="pool_not_a_DevicePool"),
]


@pytest.mark.parametrize("options, error, named", OPEN_ERRORS)
def test_config_rejected_at_open_leaves_model_untouched(options, error, named, snapshot, open_models):
    model = build(TinyLM, tied=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    snap = snapshot(model)
    with pytest.raises(error) as err:
        with vzstream.session(model, device="cpu", **options):
            pytest.fail("the session opened")
    assert named in str(err.value)
    snap.check(model)
    assert model not in open_models
    with vzstream.session(model, device="cpu") as s:   # nothing left half-open
        assert torch.equal(s(ids), ref)
    snap.check(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks CUDA on this machine")
def test_auto_device_is_cpu_without_a_gpu():
    model, x, ref = stack_with_reference()
    with vzstream.session(model) as s:
        assert s.backend.name == "cpu"
        assert torch.equal(s(x), ref)


# `codec` is parsed once into a `Codec`, a str Enum: code still comparing with "zstd" keeps working.
@pytest.mark.parametrize("value, member", [
    pytest.param("zstd", Codec.ZSTD, id="zstd"), pytest.param("nibble", Codec.NIBBLE, id="nibble"),
    pytest.param(Codec.NIBBLE, Codec.NIBBLE, id="Codec.NIBBLE"),
])
def test_codec_is_parsed_to_a_codec(value, member):
    cfg = build_config({"codec": value})
    assert cfg.codec is member and isinstance(cfg.codec, Codec)
    assert cfg.codec == member.value and f"{cfg.codec}" == str(cfg.codec) == member.value
    assert {member.value: 1}[cfg.codec] == 1            # hashes as its string
    assert build_config({}).codec is Codec.AUTO


def test_codec_names_are_defined_once():
    assert CODECS == tuple(c.value for c in Codec) == ("zstd", "nibble", "auto")
    assert codec.CODINGS == ("zstd", "nibble")          # what pack codes with


WHAT_AUTO_IS = pytest.mark.skipif(bool(os.environ.get("VZSTREAM_TEST_CODEC")),
                                  reason="VZSTREAM_TEST_CODEC changes what auto resolves to (conftest)")


@WHAT_AUTO_IS
@pytest.mark.parametrize("backend, expected", [("cuda", Codec.NIBBLE), ("cpu", Codec.ZSTD), ("fake", Codec.ZSTD)])
def test_auto_codec_is_nibble_on_cuda_and_zstd_elsewhere(backend, expected):
    assert Codec.AUTO.resolve(backend) is expected
    assert Codec.ZSTD.resolve("cuda") is Codec.ZSTD and Codec.NIBBLE.resolve("cpu") is Codec.NIBBLE


@WHAT_AUTO_IS
def test_a_session_reports_the_codec_auto_resolved_to():
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
    with vzstream.session(model, device="cpu", units=["0", "1", "2"]) as s:
        assert s.config.codec is Codec.ZSTD


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in ("lz4", "ZSTD", "AUTO", "", None, 1, ["zstd"])])
def test_bad_codec_lists_the_names_and_what_each_trades(value):
    for name, call in (("codec", lambda: build_config({"codec": value})),
                       ("coding", lambda: codec.parse_codec(value, "coding"))):
        with pytest.raises(vzstream.ConfigError) as err:
            call()
        message = str(err.value)
        assert f"`{name}`" in message and repr(value) in message
        assert "'zstd'" in message and "'nibble'" in message
        assert "host RAM" in message and "device expands" in message and "host decode" in message


# One range of zstd levels, [MIN_LEVEL, MAX_LEVEL] = [-7, 22], in SessionConfig and in packing.
LEVELS_OK = [None, codec.MIN_LEVEL, -1, 0, 3, codec.MAX_LEVEL]
LEVELS_BAD = [codec.MIN_LEVEL - 1, codec.MAX_LEVEL + 1, -(1 << 17), 99, 2.5, True, "3"]


def test_level_bounds_are_minus_7_to_22():
    assert (codec.MIN_LEVEL, codec.MAX_LEVEL) == (-7, 22)


@pytest.mark.parametrize("level", [pytest.param(v, id=repr(v)) for v in LEVELS_OK])
def test_level_in_range_is_accepted_by_config_and_pack(level):
    assert build_config({"level": level}).level == level
    t = (torch.randn(8192) * 0.02).to(torch.bfloat16)
    img, entries = image.pack_image([t], 512, lambda n: torch.empty(n, dtype=torch.uint8), "zstd", level)
    assert torch.equal(decode(entries[0]), t)          # coded, or raw where the level saves < 5%


@pytest.mark.parametrize("level", [pytest.param(v, id=repr(v)) for v in LEVELS_BAD])
def test_level_out_of_range_is_rejected_by_config_and_pack(level):
    for call in (lambda: build_config({"level": level}), lambda: codec.check_level(level)):
        with pytest.raises(vzstream.ConfigError) as err:
            call()
        message = str(err.value)
        assert "`level`" in message and "[-7, 22]" in message and repr(level) in message
        assert "Leave it None" in message
