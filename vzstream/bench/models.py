"""Model presets for the demo and the benchmarks: Llama-architecture configs, random init.

No weights are downloaded: models are built from configs with a fixed seed (or loaded from a
local Hugging Face directory, in its checkpoint's dtype unless one is asked for). Presets are
built directly in bf16 by default: that halves the time and the peak RAM (llama-3-8b would need
32 GB in fp32).
"""

from __future__ import annotations

import contextlib
import os

import torch

from vzstream.errors import ConfigError

PRESETS = {
    # small: finishes the demo in well under a minute on 2 CPU cores
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(name: str, *, dtype: torch.dtype | None = None, seed: int = 0, layers: int | None = None,
                device: str | None = None):
    """A preset (random init, seeded; bf16 unless `dtype`) or a local HF causal-LM directory (its
    checkpoint's dtype unless `dtype`), in eval mode. `device`: build (and initialise) there: on a
    GPU an 8B model takes seconds, not minutes of serial CPU init; the same seed gives the same
    weights on the same device. An unknown name raises ConfigError before anything is loaded."""
    check_model_name(name)
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("this needs transformers: pip install 'vzstream[hf]'") from exc
    if _is_packed(name):
        return _from_packed(name, dtype, device)
    if os.path.isdir(name):
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", device_map=device).eval()
    kwargs = dict(PRESETS[name])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    with _default_dtype(dtype or torch.bfloat16), torch.device(device or "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.eval()


def _is_packed(name: str) -> bool:
    return os.path.isfile(os.path.join(name, "vzstream.index.json"))


def _from_packed(path: str, dtype, device):
    """A packed file's model, whole in RAM (the benches compare against it resident): built on
    meta from the stored config, its weights kept from a session that read them."""
    import vzstream
    from vzstream.fromfile import meta_model

    model = meta_model(vzstream.open_packed(path))
    with vzstream.session(model, weights=path, device="cpu", materialize=True):
        pass
    return model.to(device=device or "cpu", dtype=dtype)


def check_model_name(name: str) -> None:
    """`name` is a preset, a Hugging Face model directory (it has a config.json) or a packed file
    (`vzstream.save`); else ConfigError."""
    if name in PRESETS or _is_packed(name):
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"`MODEL` {name!r} has no config.json, so it is not a Hugging Face model directory; "
                              f"pass the directory `save_pretrained` wrote.")
        return
    if os.sep in name or name.startswith((".", "~")) or os.path.exists(name):
        raise ConfigError(f"`MODEL` {name!r}: no such directory. Pass a local Hugging Face model directory, "
                          f"or a preset with --preset ({', '.join(PRESETS)}).")
    raise ConfigError(f"`--preset` must be one of {', '.join(PRESETS)}, or `MODEL` a local Hugging Face model "
                      f"directory; got {name!r}, which is neither.")


def prompt(model, batch: int = 1, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids `[batch, length]` within the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def model_nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
