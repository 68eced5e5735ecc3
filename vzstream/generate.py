"""Generation: greedy decoding for plain modules, and the async API over a session.

`agenerate` and `stream` run generation on a worker thread so the event loop stays
responsive; the pool lock is taken on that thread. Cancelling the awaiting task, or closing
the `stream` generator (leaving `async with contextlib.aclosing(s.stream(...))`, or the
generator being collected), sets a flag that ends generation at the next token, then waits
for the thread, so no worker is left running and the session stays usable. Leaving the
session cancels any generation still running.
"""

from __future__ import annotations

import asyncio
import threading

import torch

from .errors import ConfigError


_GREEDY_IGNORES = frozenset({"attention_mask", "pad_token_id", "eos_token_id", "use_cache"})


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int = 16, *, on_token=None,
           cancel: threading.Event | None = None, do_sample: bool = False, **kwargs) -> torch.Tensor:
    """Greedy decoding for a model mapping `input_ids [B, S]` to logits `[B, S, V]`."""
    unknown = sorted(set(kwargs) - _GREEDY_IGNORES)
    if unknown or do_sample:
        raise ConfigError(
            f"`generate` on a plain nn.Module is greedy decoding: it takes `max_new_tokens` (and ignores "
            f"{', '.join(sorted(_GREEDY_IGNORES))}); got {'do_sample=True' if do_sample else ', '.join(unknown)}. "
            f"Drop the option, or give the model a Hugging Face `generate`.")
    ids = input_ids
    for _ in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            break
        out = model(ids)
        logits = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)  # [B, S, V]
        new = logits[:, -1].argmax(-1, keepdim=True)                                       # [B, 1]
        ids = torch.cat([ids, new], dim=1)
        if on_token is not None:
            on_token(new)
    return ids


class _TokenStreamer:
    """Duck-typed Hugging Face streamer: skips the prompt, hands each new token `[B, 1]` on,
    and forwards everything to the caller's own streamer, if any."""

    def __init__(self, on_token, inner=None) -> None:
        self.on_token, self.inner, self.seen_prompt = on_token, inner, False

    def put(self, value: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.put(value)
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token(value.reshape(-1, 1))

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def _hf_stop_on(cancel: threading.Event, given=None):
    """The caller's stopping criteria plus one that fires once `cancel` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([*(given or []), _Cancelled()])


def hf_generate_kwargs(cancel: threading.Event, on_token, kwargs: dict) -> dict:
    """`kwargs` for a Hugging Face `generate` that stops once `cancel` is set and hands each
    new token to `on_token`."""
    kwargs = dict(kwargs)
    kwargs["stopping_criteria"] = _hf_stop_on(cancel, kwargs.get("stopping_criteria"))
    if on_token is not None:
        kwargs["streamer"] = _TokenStreamer(on_token, kwargs.get("streamer"))
    return kwargs


async def open_in_thread(open_fn, close_fn) -> None:
    """`open_fn()` off the event loop (packing must not block it). The thread gets the caller's
    current GPU, so device="cuda" means the same card as in a plain `with`. Cancelled meanwhile,
    `close_fn` undoes what the thread opened (`__aexit__` will not run)."""
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def open_here():
        if device is not None:
            torch.cuda.set_device(device)
        open_fn()

    fut = asyncio.ensure_future(asyncio.to_thread(open_here))
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        await _finish(fut)
        await asyncio.to_thread(close_fn)
        raise


async def close_in_thread(close_fn) -> None:
    """`close_fn()` off the event loop, shielded: a cancellation meanwhile (a timeout, Ctrl-C under
    asyncio.run) must not return before the thread has put the model back; it is raised after."""
    fut = asyncio.ensure_future(asyncio.to_thread(close_fn))
    cancelled = await _settle(fut)
    try:
        fut.result()                       # close's own error: the cancellation's context
    finally:
        if cancelled:
            raise asyncio.CancelledError


async def cancellable(run):
    """`run(cancel)` on a thread; cancelling the awaiting task sets `cancel` and waits for it."""
    cancel = threading.Event()
    fut = asyncio.get_running_loop().run_in_executor(None, lambda: run(cancel))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        await _finish(fut)
        raise


async def stream_tokens(run):
    """Each new token `[B, 1]` of `run(cancel, on_token)`, run on a thread, as it comes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel, done = threading.Event(), object()

    def thread():
        try:
            return run(cancel, lambda t: loop.call_soon_threadsafe(queue.put_nowait, t))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    fut = loop.run_in_executor(None, thread)
    try:
        while (item := await queue.get()) is not done:
            yield item
        await fut                        # re-raise an error from the generation thread
    finally:
        cancel.set()
        await _finish(fut)


async def _settle(fut) -> bool:
    """Wait until `fut` is done, even through cancellations of the awaiting task; True if there
    was one (the caller raises it once `fut` is done)."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait({fut})          # never raises fut's error, never cancels fut
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


async def _finish(fut) -> None:
    """Wait for a generation thread to end (even while being cancelled), dropping its errors."""
    try:
        await asyncio.shield(fut)
    except BaseException:
        if not fut.done():
            await asyncio.wait([fut])
