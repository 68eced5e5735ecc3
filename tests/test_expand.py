"""backends/expand.py: a nibble-coded chunk of a bf16 / fp16 tensor expanded into its slot, bit for
bit, from inputs the encoder made (`nibble.encode` of the top plane, as `image.pack_image` codes a
lane) laid out as views of one landing buffer; whole tensors and chunks split at even offsets, and
a chunk of a real wire image (`Image.nibble_views`); the torch fallback in process and the Triton
kernel under `TRITON_INTERPRET=1` in one subprocess; kernel launches counted per chunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vzstream import image, nibble
from vzstream.backends import expand as ex

ROOT = Path(__file__).resolve().parents[1]
SIZES = [0, 1, 2, 3, 1023, 4097]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ["weights", "specials"]
MAX_TORCH_LAUNCHES, MAX_TRITON_LAUNCHES = 5, 2

# Bit patterns whose bytes a float compare would blur: -0.0, infinities, NaNs with payloads and
# signs, subnormals, the largest finite value.
SPECIAL_BITS = {
    torch.bfloat16: [0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7FC1, 0x7F81, 0xFFC3, 0x0001, 0x807F, 0x7F7F],
    torch.float16: [0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7E01, 0x7C01, 0xFE05, 0x0001, 0x83FF, 0x7BFF],
}
CASES = [(d, k, n) for d in DTYPES for k in KINDS for n in SIZES]
CASE_IDS = [f"{d}-{k}-n{n}" for d, k, n in CASES]


def make_tensor(dtype_name: str, kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """"weights": N(0, 0.02). "specials": the same, with every 64th element drawn over the whole
    exponent range (top bytes the 16-value table misses: patches) and SPECIAL_BITS sprinkled in,
    the first ones at the front so that even n = 1 holds one."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 0.02
    if kind == "specials":
        low, high = (-140, 120) if dtype == torch.bfloat16 else (-26, 16)
        wide = torch.randn(n, generator=g) * torch.exp2(torch.randint(low, high, (n,), generator=g).float())
        t = torch.where(torch.arange(n) % 64 == 5, wide, t)
    bits = t.to(dtype).view(torch.int16)
    if kind == "specials" and n:
        special = torch.tensor(SPECIAL_BITS[dtype], dtype=torch.int32).to(torch.int16)  # wraps to signed
        at = torch.cat([torch.arange(min(n, 3)), torch.randint(0, n, (n // 100,), generator=g)])
        bits[at] = special[torch.arange(at.numel()) % special.numel()]
    return bits.view(dtype)


def wire(t: torch.Tensor) -> tuple[np.ndarray, nibble.Nibbles]:
    """(low plane, nibble code of the top plane): what a nibble chunk of `t` carries, coded as
    `image.pack_image` codes it (`nibble.encode`; here with the tensor's own table, and even where
    an image would keep `t` raw: tiny tensors, fp16 whose top byte holds mantissa bits)."""
    planes = t.reshape(-1).view(torch.uint8).numpy().reshape(-1, 2)      # little-endian: (lo, top)
    return planes[:, 0].copy(), nibble.encode(planes[:, 1].copy())


def land(lo: np.ndarray, nib: nibble.Nibbles, start: int, stop: int) -> tuple:
    """Chunk [start, stop) as it lands on a device: views of one uint8 buffer, each segment at an
    8-byte aligned offset, patches re-based to the chunk. `start` is even."""
    first, last = np.searchsorted(nib.patch_at, [start, stop])
    segments = [lo[start:stop], nib.codes[start // 2 : (stop + 1) // 2], nib.pairs.view(np.uint8),
                (nib.patch_at[first:last] - start).view(np.uint8), nib.patch_values[first:last]]
    offsets = np.cumsum([0] + [-(-s.size // 8) * 8 for s in segments])
    buffer = torch.zeros(int(offsets[-1]), dtype=torch.uint8)
    views = []
    for seg, off in zip(segments, offsets):
        view = buffer[off : off + seg.size]
        view.copy_(torch.from_numpy(seg.copy()))
        views.append(view)
    return views[0], views[1], views[2], views[3].view(torch.int64), views[4]


def image_chunk(t: torch.Tensor) -> tuple:
    """The views of the one chunk of a nibble image of `t` alone (alignment 2: no padding), as
    torch tensors over the image's arena: what a CUDA upload copies from, byte for byte."""
    img, _ = image.pack_image([t], 2, lambda n: torch.empty(n, dtype=torch.uint8), "nibble")
    assert img.coding == "nibble" and len(img.chunks) == 1, "the test tensor must be coded, in one chunk"
    lo, codes, pairs, at, values = img.nibble_views(img.chunks[0])
    return tuple(torch.from_numpy(v) for v in (lo, codes, pairs.view(np.uint8), at, values))


def cuts(n: int, split: bool) -> list[int]:
    """Chunk boundaries: whole, or split at even offsets (a code byte holds two elements)."""
    inner = {2, n // 2 & ~1} if split else set()
    return sorted({0, n} | {c for c in inner if 0 < c < n})


def expand_chunks(fn, t: torch.Tensor, split: bool, out: torch.Tensor) -> list[int]:
    """Expand `t`'s wire form chunk by chunk into `out` with `fn`; patches per chunk."""
    lo, nib = wire(t)
    bounds = cuts(t.numel(), split)
    num_patches = []
    for start, stop in pairwise(bounds):
        views = land(lo, nib, start, stop)
        fn(*views, out[start:stop])
        num_patches.append(views[3].numel())
    return num_patches


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that run a kernel; views only reinterpret, so they are not counted."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


# -- the encoder's inputs, so the cases below test what they claim -------------------------------

def test_cases_hold_patches_and_odd_tails():
    assert wire(make_tensor("bf16", "specials", 4097))[1].num_patches > 0
    assert wire(make_tensor("fp16", "specials", 1023))[1].num_patches > 0
    assert wire(make_tensor("bf16", "specials", 1))[1].codes.tolist()[0] >> 4 == 0      # the unused high nibble


def test_an_image_chunk_carries_what_the_cases_land():
    # The views built above hold the same code as a real image chunk: same low bytes, codes, table
    # and patches (one tensor: the image's table is the tensor's).
    t = make_tensor("bf16", "specials", 4097)
    lo, nib = wire(t)
    got = image_chunk(t)
    want = (lo, nib.codes, nib.pairs.view(np.uint8), nib.patch_at, nib.patch_values)
    assert nib.num_patches > 0 and all(np.array_equal(g.numpy(), w) for g, w in zip(got, want))


# -- torch fallback ---------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [False, True], ids=["whole", "chunks"])
@pytest.mark.parametrize("dtype_name, kind, n", CASES, ids=CASE_IDS)
def test_torch_expansion_is_bit_exact(dtype_name, kind, n, split):
    t = make_tensor(dtype_name, kind, n)
    out = torch.full((n,), 0x5A5A, dtype=torch.int16)      # a pattern, so unwritten elements show
    expand_chunks(ex.expand_torch, t, split, out)
    assert same_bytes(out, t)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_torch_expansion_into_a_float_slot(dtype_name):
    t = make_tensor(dtype_name, "specials", 1023)
    out = torch.zeros(1023, dtype=DTYPES[dtype_name])
    # CPU tensors: `expand` takes torch; the pair table also goes as 256 int16.
    expand_chunks(lambda lo, codes, pairs, *rest: ex.expand(lo, codes, pairs.view(torch.int16), *rest), t, True, out)
    assert same_bytes(out, t)


def test_torch_expands_an_image_chunk_bit_exact():
    t = make_tensor("bf16", "specials", 4097)
    out = torch.full((4097,), 0x5A5A, dtype=torch.int16)
    ex.expand_torch(*image_chunk(t), out)
    assert same_bytes(out, t)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_launches_per_chunk(kind):
    t = make_tensor("bf16", kind, 4097)
    counter = LaunchCounter()
    out = torch.empty(4097, dtype=torch.int16)
    lo, nib = wire(t)
    views = land(lo, nib, 0, 4097)
    with counter:
        ex.expand_torch(*views, out)
    assert same_bytes(out, t)
    expected = ["_to_copy", "index_select", "stack"] + (["_index_put_impl_"] if nib.num_patches else [])
    assert counter.ops == expected and len(expected) <= MAX_TORCH_LAUNCHES


def test_torch_empty_chunk_launches_nothing():
    counter = LaunchCounter()
    empty = torch.empty(0, dtype=torch.uint8)
    args = (empty, empty, torch.zeros(512, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), empty,
            torch.empty(0, dtype=torch.int16))
    with counter:
        ex.expand_torch(*args)
    assert counter.ops == []


def test_imports_and_falls_back_without_triton():
    code = """
        import sys, torch
        sys.modules["triton"] = None                        # `import triton` raises ImportError
        from vzstream.backends import expand as ex
        assert not ex.HAVE_TRITON
        pairs = torch.arange(512).to(torch.uint8)           # pairs[b] = b * 2 | (b * 2 + 1) << 8
        out = torch.empty(3, dtype=torch.int16)
        lo, codes = torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([5, 7], dtype=torch.uint8)
        ex.expand(lo, codes, pairs, torch.tensor([1]), torch.tensor([9], dtype=torch.uint8), out)
        assert out.tolist() == [10 << 8 | 1, 9 << 8 | 2, 14 << 8 | 3], out.tolist()
        try:
            ex.expand_triton(lo, codes, pairs, torch.tensor([1]), torch.tensor([9], dtype=torch.uint8), out)
        except ImportError:
            pass
        else:
            raise AssertionError("expand_triton ran without triton")
    """
    run_python(code, {})


# -- Triton kernel, under the interpreter -----------------------------------------------------------

def run_python(code: str, env: dict) -> str:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def counting(fn, launches: list, per_chunk: list):
    """`fn`, appending to `per_chunk` the launches each call made."""
    def counted(*args):
        launches.clear()
        fn(*args)
        per_chunk.append(len(launches))
    return counted


def triton_cases() -> None:
    """Run in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before triton is first
    imported): every case, whole and split, and an image chunk ("image"), through `expand_triton` on
    CPU tensors. Prints one JSON line: case id -> [bit exact, launches per chunk, patches per chunk]."""
    launches = []
    for kernel in (ex._expand_kernel, ex._patch_kernel):
        run = kernel.run

        def counted(*args, _run=run, **kwargs):
            launches.append(1)
            return _run(*args, **kwargs)

        kernel.run = counted                   # `kernel[grid](...)` calls `kernel.run(grid=...)`
    results = {}
    for (dtype_name, kind, n), case_id in zip(CASES, CASE_IDS):
        for split in (False, True):
            t = make_tensor(dtype_name, kind, n)
            out = torch.full((n,), 0x5A5A, dtype=torch.int16)
            per_chunk = []
            num_patches = expand_chunks(counting(ex.expand_triton, launches, per_chunk), t, split, out)
            results[f"{case_id}-{'chunks' if split else 'whole'}"] = [same_bytes(out, t), per_chunk, num_patches]
    t = make_tensor("bf16", "specials", 4097)
    out, per_chunk, views = torch.full((4097,), 0x5A5A, dtype=torch.int16), [], image_chunk(t)
    counting(ex.expand_triton, launches, per_chunk)(*views, out)
    results["image"] = [same_bytes(out, t), per_chunk, [views[3].numel()]]
    print(json.dumps(results))


@pytest.fixture(scope="module")
def triton_results() -> dict:
    pytest.importorskip("triton", reason="the Triton kernel test needs `pip install triton`")
    out = run_python("import test_expand; test_expand.triton_cases()", {"TRITON_INTERPRET": "1"})
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("split", [False, True], ids=["whole", "chunks"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_triton_expansion_is_bit_exact_with_few_launches(triton_results, case_id, split):
    exact, launches, num_patches = triton_results[f"{case_id}-{'chunks' if split else 'whole'}"]
    assert exact
    # One launch per non-empty chunk, one more when it has patches; an empty chunk launches none.
    n = int(case_id.rsplit("n", 1)[1])
    assert launches == [(1 + (p > 0)) if n else 0 for p in num_patches]
    assert max(launches, default=0) <= MAX_TRITON_LAUNCHES


def test_triton_expands_an_image_chunk_bit_exact(triton_results):
    exact, launches, num_patches = triton_results["image"]
    assert exact and num_patches[0] > 0 and launches == [2]


# -- Triton kernel on a GPU -------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_triton_on_cuda_matches_torch(dtype_name):
    if not ex.HAVE_TRITON:
        pytest.skip("needs `pip install triton`")
    t = make_tensor(dtype_name, "specials", (1 << 20) + 3)
    lo, nib = wire(t)
    views = [v.cuda() for v in land(lo, nib, 0, t.numel())]
    out_triton = torch.full((t.numel(),), 0x5A5A, dtype=torch.int16, device="cuda")
    out_torch = out_triton.clone()
    ex.expand(*views, out_triton)                           # CUDA tensors: `expand` takes Triton
    ex.expand_torch(*views, out_torch)
    assert same_bytes(out_triton.cpu(), t) and same_bytes(out_torch.cpu(), t)
