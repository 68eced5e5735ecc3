"""The examples run as a user would run them (on the CPU): they must not rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def run(*args: str) -> str:
    # The checkout under test first on the path, whatever copy of vzstream is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_plain_module_example_is_exact():
    out = run(str(EXAMPLES / "plain_module.py"))
    assert "logits identical: True" in out and "tokens identical: True" in out


def test_multi_model_server_example_serves_every_request():
    out = run(str(EXAMPLES / "multi_model_server.py"))
    assert "model0: 4 requests" in out and "model1: 4 requests" in out and "pool peak device memory" in out


@pytest.mark.parametrize("codec", ["zstd", "nibble"])
def test_generate_hf_example_on_a_saved_tiny_model(codec, tmp_path):
    """A tiny Llama and a word-level tokenizer saved the Hugging Face way: what the example loads."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "the", "capital", "of", "france", "is", "paris"] + [f"w{i}" for i in range(248)]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(tmp_path)
    config = tf.LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=1)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    out = run(str(EXAMPLES / "generate_hf.py"), str(tmp_path), "--prompt", "the capital of france is",
              "--tokens", "4", "--codec", codec)
    assert out.startswith("the capital of france is") and "passes" in out
