"""CudaBackend on a real GPU: tokens and logits bit-identical to the same seeded model resident on
the same GPU, less peak device memory than resident, no host synchronisation on the forward
thread in the steady state, and pinned host memory registered while open, released after."""

import copy
import threading
import warnings

import pytest
import torch

import vzstream
from vzstream import calibrate
from vzstream.bench.budget import minimum_budget
from models import Routed, Stack, build, build_hf, hf_inputs, make_input, seeded

pytestmark = pytest.mark.cuda

CASES = [
    pytest.param(name, units, k, id=f"{name}-{units}-prefetch{k}")
    for name in ("llama", "gpt2") for units in ("blocks", "leaves") for k in (1, 2, 4)
]


def cuda_inputs(batch: int = 2, seq: int = 8):
    ids, gen_kwargs = hf_inputs(batch, seq)
    gen_kwargs["attention_mask"] = gen_kwargs["attention_mask"].cuda()
    return ids.cuda(), gen_kwargs


def resident_run(model, ids, gen_kwargs):
    """Two greedy generates and one forward of a resident copy of `model`, on the GPU."""
    ref = copy.deepcopy(model).to("cuda")
    with torch.no_grad():
        tokens = [ref.generate(ids, **gen_kwargs) for _ in range(2)]
        logits = ref(ids).logits
    del ref
    torch.cuda.empty_cache()      # tests may; the library never does
    return tokens, logits


@pytest.mark.parametrize("name, units, prefetch", CASES)
def test_streamed_equals_resident_on_the_same_gpu(name, units, prefetch, snapshot):
    model = build_hf(name)
    ids, gen_kwargs = cuda_inputs()
    ref_tokens, ref_logits = resident_run(model, ids, gen_kwargs)
    snap = snapshot(model)
    with vzstream.session(model, device="cuda", prefetch=prefetch, units=units) as s:
        first = s.generate(ids, **gen_kwargs)         # learns the trace
        second = s.generate(ids, **gen_kwargs)        # entirely on the learned schedule
        logits = s(ids).logits
        stats = s.stats()
    assert torch.equal(first, ref_tokens[0]) and torch.equal(second, ref_tokens[1])
    assert logits.dtype == ref_logits.dtype and torch.equal(logits, ref_logits)
    assert stats.trace_misses == 0 and stats.prefetched > 0
    snap.check(model)


def test_trace_misses_drain_and_stay_exact(snapshot):
    """A routed toy model changes path every call: drained prefetches must never corrupt a slot."""
    model = build(Routed, dtype=torch.bfloat16, num_blocks=6)
    x = make_input(4, 64, dtype=torch.bfloat16).cuda()
    orders = [None, (0, 2, 4), (5, 4, 3, 2, 1, 0), (1, 1, 1), None, (3,)]
    ref = copy.deepcopy(model).to("cuda")
    with torch.no_grad():
        expected = [ref(x, order=o) for o in orders]
    del ref
    snap = snapshot(model)
    with vzstream.session(model, device="cuda", prefetch=4, units="blocks") as s:
        for _ in range(2):
            for order, want in zip(orders, expected):
                assert torch.equal(s(x, order=order), want)
    snap.check(model)


def mid_llama(num_layers: int = 8):
    """8 layers, hidden 512, small vocab: blocks dominate, so streaming must save memory."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=num_layers,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with seeded(0):
        model = tf.LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def test_peak_device_memory_below_resident():
    model = mid_llama()
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = copy.deepcopy(model).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ref_tokens = ref.generate(ids, **kwargs)
    torch.cuda.synchronize()
    resident_peak = torch.cuda.max_memory_allocated()
    del ref
    torch.cuda.empty_cache()
    with vzstream.session(model, device="cuda", prefetch=2) as s:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        tokens = [s.generate(ids, **kwargs) for _ in range(2)]
        torch.cuda.synchronize()
        streamed_peak = torch.cuda.max_memory_allocated()
    assert all(torch.equal(t, ref_tokens) for t in tokens)
    assert streamed_peak < resident_peak, (streamed_peak, resident_peak)


def test_no_host_sync_on_the_forward_thread_in_steady_state(monkeypatch):
    model = build_hf("llama", num_layers=4)
    ids, gen_kwargs = cuda_inputs()
    forward_thread, calls = threading.get_ident(), []

    def counting(fn):
        def counted(*args, **kwargs):
            if threading.get_ident() == forward_thread:
                calls.append(fn.__qualname__)
            return fn(*args, **kwargs)
        return counted

    with vzstream.session(model, device="cuda", prefetch=2, units="leaves") as s:
        s.generate(ids, **gen_kwargs)                 # first call: learns the trace
        for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                            (torch.cuda.Stream, "synchronize")):
            monkeypatch.setattr(owner, name, counting(getattr(owner, name)))
        s.generate(ids, **gen_kwargs)
        monkeypatch.undo()
    assert calls == []


@pytest.mark.parametrize("codec", ["zstd", "nibble"])
def test_no_implicit_sync_on_the_forward_thread(codec, monkeypatch):
    """torch's sync debug mode flags synchronising CUDA calls that no patch above can see (a
    blocking copy, `.item()`, a stream synchronise inside torch): none may come from the forward
    thread of a streamed pass. A toy model of plain layers, so the model itself never syncs;
    blocks of 12 MiB, so decoding runs on workers through the pinned staging ring. With
    codec="nibble" nothing is staged, so no thread may synchronise: not the one issuing the
    uploads, with their gathers, patches and merges."""
    model = build(Stack, dtype=torch.bfloat16, num_blocks=6, dim=1024)
    x = make_input(4, 1024, dtype=torch.bfloat16).cuda()
    forward_thread, flagged = threading.get_ident(), []

    def record(message, category, filename, lineno, file=None, line=None):
        # set_sync_debug_mode itself warns that the mode is a prototype: not a synchronisation.
        watched = codec == "nibble" or threading.get_ident() == forward_thread
        if watched and "is a prototype" not in str(message):
            flagged.append(f"{threading.current_thread().name} {filename}:{lineno}: {message}")

    with vzstream.session(model, device="cuda", prefetch=2, codec=codec) as s:
        ref = s(x)                                    # learns the trace
        s(x)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record             # restored by catch_warnings
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outs = [s(x) for _ in range(3)]
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert flagged == []
    assert all(torch.equal(o, ref) for o in outs)


def test_arenas_pinned_while_open_and_unpinned_after():
    model = build_hf("llama", num_layers=4)
    ids, gen_kwargs = cuda_inputs()
    with vzstream.session(model, device="cuda", prefetch=1) as s:
        s.generate(ids, **gen_kwargs)
        heap = s.backend.heap
        assert all(store.arena.is_pinned() for store in s.stores.values())
        arena_nbytes = sum(store.arena.numel() for store in s.stores.values())
        assert arena_nbytes <= heap.nbytes
    assert heap.nbytes == 0


@pytest.mark.parametrize("codec", ["zstd", "nibble"])
def test_budget_accounting_matches_the_allocator(codec):
    """Under a budget, what vzstream counts on the device matches what the caching allocator
    holds for it, and the allocator's peak (activations included) stays within the budget (with
    codec="nibble" the scratch is two landing buffers of a unit's largest chunk; 12 layers leave
    room between the minimum and the model)."""
    model = mid_llama(8 if codec == "zstd" else 12)
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = copy.deepcopy(model).to("cuda")
    with torch.no_grad():
        ref_tokens = ref.generate(ids, **kwargs)
    model_nbytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    del ref
    torch.cuda.empty_cache()
    # The planner's own minimum (ring + merge scratch), plus half of what remains of the model:
    # some units resident, some streamed. (Minimum + half the model held all of it.)
    minimum, reserve = minimum_budget(model, "cuda", prefetch=2, codec=codec), 64 << 20
    budget = minimum + (model_nbytes - minimum) // 2
    assert minimum < budget < model_nbytes, (minimum, budget, model_nbytes)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with vzstream.session(model, device="cuda", prefetch=2, vram_budget=budget + reserve,
                          activation_reserve=reserve, codec=codec) as s:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        counted = s.backend.device_nbytes
        torch.cuda.reset_peak_memory_stats()
        tokens = [s.generate(ids, **kwargs) for _ in range(2)]
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        stats = s.stats()
    assert all(torch.equal(t, ref_tokens) for t in tokens)
    assert 0 < stats.units_resident and stats.streamed_nbytes_per_pass > 0
    assert counted <= held <= counted + (4 << 20), (counted, held)   # allocator rounding only
    assert stats.peak_device_nbytes <= budget + reserve
    assert peak <= budget + reserve, (peak, budget + reserve)


def test_auto_raw_fraction_measures_the_bus_and_stays_exact(snapshot):
    """raw_fraction="auto" times real pinned uploads and the workers' decode at open (zstd: with
    the default codec, nothing is decoded on the host); whatever share it then keeps raw, the
    tokens are the resident ones."""
    model = build_hf("llama", num_layers=4)
    ids, gen_kwargs = cuda_inputs()
    ref_tokens, _ = resident_run(model, ids, gen_kwargs)
    snap = snapshot(model)
    with vzstream.session(model, device="cuda", prefetch=2, raw_fraction="auto", codec="zstd") as s:
        tokens = [s.generate(ids, **gen_kwargs) for _ in range(2)]
        stats = s.stats()
        again = s.backend.upload_gbps()
        planned = [u for u in s.units if u.streamed]
        kept_raw = {i for i, store in s.stores.items() if not store.compressed}
    assert torch.equal(tokens[0], ref_tokens[0]) and torch.equal(tokens[1], ref_tokens[1])
    assert stats.upload_gbps_measured > 1.0 and stats.decode_gbps_measured > 0    # any PCIe moves > 1 GB/s
    assert again == stats.upload_gbps_measured                                     # measured once
    fraction = calibrate.balanced_fraction(stats.decode_gbps_measured, stats.upload_gbps_measured)
    probe = max(planned, key=lambda u: u.raw_nbytes)                          # the sample: the largest
    assert kept_raw == calibrate.raw_units(planned, fraction, keep={probe.index})
    snap.check(model)


@pytest.mark.parametrize("units, prefetch", [("blocks", 2), ("leaves", 4)])
def test_nibble_codec_equals_resident_on_the_same_gpu(units, prefetch, snapshot):
    """codec="nibble": each unit's wire image lands chunk by chunk and the device expands it on
    the merge stream; raw_fraction="auto" then keeps nothing raw, since nothing is decoded on the host."""
    model = build_hf("llama")
    ids, gen_kwargs = cuda_inputs()
    ref_tokens, ref_logits = resident_run(model, ids, gen_kwargs)
    snap = snapshot(model)
    with vzstream.session(model, device="cuda", prefetch=prefetch, units=units, codec="nibble",
                          raw_fraction="auto") as s:
        tokens = [s.generate(ids, **gen_kwargs) for _ in range(2)]
        logits = s(ids).logits
        stats = s.stats()
        coded = sum(st.image is not None and len(st.image.chunks) for st in s.stores.values())
        wire = sum(st.wire_nbytes for st in s.stores.values())
    assert torch.equal(tokens[0], ref_tokens[0]) and torch.equal(tokens[1], ref_tokens[1])
    assert torch.equal(logits, ref_logits)
    assert coded > 0 and wire < 0.9 * stats.raw_nbytes and stats.upload_gbps_measured == 0
    snap.check(model)

