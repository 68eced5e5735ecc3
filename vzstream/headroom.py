"""Headroom: a budget kept while memory outside vzstream's own grows between passes.

The activation reserve is measured on the traced pass, often a prefill; a long generation's
KV cache then grows by a few KiB per token, past what was measured. Two defences:

- `kv_growth_nbytes`: when `generate` knows `max_new_tokens` and the model's config says how
  big a token's cache is, the pool plans again with that growth reserved, before generating
  (`DevicePool.expect_growth`), or raises what fits.
- `Headroom`: otherwise, under a budget on a backend that can say how much device memory is in
  use (CUDA), each pass is checked before it starts: the memory in use now plus what the last
  pass added at its peak must stay within the budget, else `ConfigError` names
  `activation_reserve`, and the pass never runs. Three allocator queries per pass; no sync.
"""

from __future__ import annotations

from .errors import ConfigError

MIB = 1 << 20


class Headroom:
    """Checks each pass against `budget`; `backend.in_use()` must not be None."""

    def __init__(self, backend, budget: int) -> None:
        self.backend, self.budget = backend, budget
        # What was on the device before this session, not vzstream's: never the session's.
        self.outside = backend.in_use() - backend.device_nbytes
        self.transient = 0          # bytes the last pass allocated past its end, at its peak
        self.start = 0

    def check(self, enforce: bool = True) -> None:
        """Before a pass: raise, naming `activation_reserve`, if it would cross the budget (not
        on a traced pass, `enforce=False`: the plan is measuring its activations)."""
        now = self.backend.in_use()
        others = now - self.outside - self.backend.device_nbytes      # activations, KV cache, outputs
        if enforce and self.transient and now - self.outside + self.transient > self.budget:
            need = others + self.transient
            raise ConfigError(
                f"the next pass would take the device past `vram_budget` ({self.budget / MIB:.1f} MiB): memory "
                f"outside vzstream's weights (activations, a growing KV cache, outputs) is {others / MIB:.1f} MiB now "
                f"and the last pass added {self.transient / MIB:.1f} MiB at its peak, more than the activation "
                f"reserve planned for. Nothing ran past the budget. Set "
                f"`activation_reserve` to at least {need} bytes (fewer units stay resident) or raise `vram_budget`; "
                f"with `s.generate`, a known `max_new_tokens` is reserved for up front.")
        self.start = now

    def ended(self, peak_over_start: int | None) -> None:
        """After a pass: how far past its end it peaked (the next pass's likely extra)."""
        if peak_over_start is not None:
            self.transient = max(0, self.start + peak_over_start - self.backend.in_use())


def kv_growth_nbytes(model, input_ids, kwargs: dict) -> int:
    """Bytes of KV cache that `generate(input_ids, **kwargs)` adds past the prompt, from a
    Hugging Face config (0 when it cannot tell: no config, no `max_new_tokens`)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return 0
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    new = kwargs.get("max_new_tokens")
    if new is None:
        new = getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
    heads = getattr(config, "num_attention_heads", None)
    if not new or not heads or getattr(input_ids, "ndim", 0) != 2:
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rows = input_ids.shape[0] * max(kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences") or 1)
    itemsize = model.dtype.itemsize
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize * rows * int(new)
