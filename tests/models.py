"""Toy models and tiny Hugging Face models shared by the tests.

Every builder is seeded (it forks the global RNG, so it never disturbs other tests) and cheap:
tests build a fresh model each time instead of sharing one that a buggy session could leave
altered. `transformers` is imported lazily, inside the HF builders only.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

DIM = 64                  # toy hidden size: big enough that bf16 `hi` planes compress into frames
NUM_BLOCKS = 4
VOCAB = 256
NEW_TOKENS = 6            # generate(..., max_new_tokens=NEW_TOKENS)


@contextmanager
def seeded(seed: int):
    """Build under `torch.manual_seed(seed)` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_input(*shape: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


class BlockFailure(RuntimeError):
    """Raised by a toy block on demand (the exception-inside-forward tests)."""


class Block(nn.Module):
    """A residual MLP block with two parameter-owning leaves (so "leaves" differs from "blocks")."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, fail: type[BaseException] | None = None) -> torch.Tensor:
        if fail is not None:
            raise fail("block failed on demand")
        return x + self.down(torch.tanh(self.up(x)))


class Stack(nn.Module):
    """Blocks called in list order. `skip=i` leaves block i out (a conditional path);
    `fail_at=i` makes block i raise `fail_with` from inside its forward."""

    def __init__(self, num_blocks: int = NUM_BLOCKS, dim: int = DIM) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(num_blocks))

    def forward(self, x, skip: int | None = None, fail_at: int | None = None,
                fail_with: type[BaseException] = BlockFailure):
        for i, block in enumerate(self.blocks):
            if i != skip:
                x = block(x, fail=fail_with if i == fail_at else None)
        return x


class Reordered(nn.Module):
    """Blocks created in one order and called in another (diffusers' group-offloading test)."""

    CALL_ORDER = (2, 0, 3, 1)

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in self.CALL_ORDER)

    def forward(self, x):
        for i in self.CALL_ORDER:
            x = self.blocks[i](x)
        return x


class Shared(nn.Module):
    """One block object called twice in a pass (a shared module): call order 0, 1, 0, 2."""

    CALL_ORDER = (0, 1, 0, 2)

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(3))

    def forward(self, x):
        for i in self.CALL_ORDER:
            x = self.blocks[i](x)
        return x


class Routed(nn.Module):
    """Each call takes the path it is given (MoE-style routing): `order` may skip, repeat or
    reorder blocks, so the trace can change from one pass to the next."""

    def __init__(self, num_blocks: int = NUM_BLOCKS, dim: int = DIM) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(num_blocks))

    def forward(self, x, order=None):
        for i in range(len(self.blocks)) if order is None else order:
            x = self.blocks[i](x)
        return x


class Scaled(nn.Module):
    """Owns a parameter directly AND has a parameter-owning child: nested units under "leaves"."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.inner = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.tanh(self.inner(x)) * self.scale


class NestedLeaves(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scaled(dim) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class TinyLM(nn.Module):
    """A plain (non-HF) language model: input_ids [B, S] -> logits [B, S, V].
    `tied=True` shares the embedding matrix with the head (like GPT-2)."""

    def __init__(self, num_blocks: int = NUM_BLOCKS, dim: int = DIM, vocab: int = VOCAB, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, dim))
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids):
        x = self.embed(input_ids) * self.pos_scale      # [B, S, D]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))                  # [B, S, V]


def build(cls, *args, dtype=torch.float32, seed: int = 0, **kwargs) -> nn.Module:
    """A seeded toy model in `dtype`, in eval mode."""
    with seeded(seed):
        model = cls(*args, **kwargs)
    return model.to(dtype).eval()


def stack_with_reference() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded `Stack`, an input batch, and the model's resident output for it."""
    model = build(Stack)
    x = make_input(2, DIM)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def greedy_resident(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The reference greedy loop, run on the resident model."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(ids)                                     # [B, S, V]
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# -- tiny Hugging Face models -----------------------------------------------------------------

HF_MODELS = ("llama", "qwen2", "mistral", "gpt2")


def hf_config(name: str, num_layers: int = 2):
    """A tiny config: hidden 64, intermediate 128, vocab 256, no bos/eos (generate runs full length)."""
    import transformers as tf

    tokens = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=num_layers, n_head=4,
                             n_positions=64, tie_word_embeddings=True, **tokens)
    llama_like = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **tokens)
    if name == "llama":
        return tf.LlamaConfig(**llama_like)
    if name == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if name == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    raise KeyError(name)


def build_hf(name: str, dtype=torch.bfloat16, seed: int = 0, num_layers: int = 2) -> nn.Module:
    import transformers as tf

    classes = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
               "mistral": tf.MistralForCausalLM, "gpt2": tf.GPT2LMHeadModel}
    config = hf_config(name, num_layers)
    with seeded(seed):
        model = classes[name](config)
    return model.to(dtype).eval()


def hf_inputs(batch: int = 2, seq: int = 8, seed: int = 1) -> tuple[torch.Tensor, dict]:
    """input_ids [B, S] and the generate kwargs (greedy, attention mask, pad id: no warnings)."""
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return ids, kwargs


PROMPT = "the capital of france is"


def save_tiny_llama(path, tokenizer: bool = True):
    """A tiny Llama directory as `save_pretrained` writes it (fp32 weights), with, if `tokenizer`,
    a word-level tokenizer built offline (nothing is downloaded): the words of `PROMPT`, then
    `w0`, `w1`, ... up to the model's vocabulary, so every generated id decodes to a word."""
    import transformers as tf
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    config = hf_config("llama")
    config.pad_token_id = 1
    with seeded(0):
        tf.LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer:
        words = ["<unk>", "<pad>", *PROMPT.split()]
        words += [f"w{i}" for i in range(VOCAB - len(words))]
        core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>").save_pretrained(path)
    return path


# -- budget helpers ---------------------------------------------------------------------------------

def numbers_in(message: str) -> list[int]:
    """Every whole number an error message names."""
    return [int(n) for n in re.findall(r"\d+", message)]


def opens_at(model, budget: int, **options) -> bool:
    """Whether a CPU session on `model` opens under `vram_budget=budget`."""
    import vzstream

    try:
        with vzstream.session(model, device="cpu", vram_budget=budget, **options):
            return True
    except vzstream.ConfigError:
        return False


def named_minimum(model, **options) -> int:
    """The minimum the ConfigError names for an impossible budget, checked to be exact: a CPU
    session opens at that budget and not one byte below it."""
    import pytest

    import vzstream

    with pytest.raises(vzstream.ConfigError, match="vram_budget") as info:
        vzstream.session(model, device="cpu", vram_budget=1, **options).open()
    exact = [n for n in set(numbers_in(str(info.value))) if n > 1
             and opens_at(model, n, **options) and not opens_at(model, n - 1, **options)]
    assert len(exact) == 1, f"no exact minimum named in: {info.value}"
    return exact[0]


def decodes_per_pass(s, run, passes: int = 3) -> float:
    """Decodes per pass once the schedule is learned (after two warm-up passes)."""
    run()
    run()
    before = s.stats().decodes
    for _ in range(passes):
        run()
    return (s.stats().decodes - before) / passes
