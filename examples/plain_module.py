"""Stream a plain `nn.Module` (no Hugging Face): `python examples/plain_module.py`.

Any model works: units default to the children of its largest `nn.ModuleList`. Here a toy
language model's blocks stream while the embedding and head stay resident; the streamed
logits and greedy tokens are checked against the resident model bit for bit.
"""

import torch
from torch import nn

import vzstream


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, S, D]
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 256, depth: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, V]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ref_logits = model(ids)
        ref_tokens = vzstream.greedy(model, ids, max_new_tokens=8)   # what s.generate runs for non-HF models

    with vzstream.session(model, device="cpu", prefetch=2) as s:
        for _ in range(2):                      # the second call runs on the learned schedule
            logits = s(ids)
            tokens = s.generate(ids, max_new_tokens=8)
        print(s.stats())
    print("logits identical:", torch.equal(logits, ref_logits))
    print("tokens identical:", torch.equal(tokens, ref_tokens))


if __name__ == "__main__":
    main()
