"""Stream any local Hugging Face causal LM: `python examples/generate_hf.py MODEL_DIR [--prompt TEXT]`.

The weights stay compressed in host RAM; each decoder layer is decoded and uploaded
just before it runs (with `--codec nibble`: uploaded as 4-bit codes, which the GPU
expands). Prints the generated text and the session's stats.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vzstream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", help="a local directory with config.json, weights and tokenizer")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--raw-fraction", default="0", help='share of layers kept uncompressed, or "auto": measure '
                    "decode and PCIe rates at open and keep raw what decoding cannot keep up with")
    ap.add_argument("--codec", default="zstd", help='"zstd" (host threads decode, least host RAM) or "nibble" '
                    "(4-bit codes the GPU expands: no host decode, 0.75x of bf16 over PCIe)")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
    inputs = tok(args.prompt, return_tensors="pt")

    raw_fraction = args.raw_fraction if args.raw_fraction == "auto" else float(args.raw_fraction)
    with vzstream.session(model, prefetch=args.prefetch, raw_fraction=raw_fraction, codec=args.codec) as s:
        device = s.backend.device
        out = s.generate(**{k: v.to(device) for k, v in inputs.items()},
                         max_new_tokens=args.tokens, do_sample=False)
        print(tok.decode(out[0], skip_special_tokens=True))
        print(s.stats())


if __name__ == "__main__":
    main()
