"""What the stand-in (standin.py) costs per unit: binding and releasing a tinyllama block's 9
parameters, before (an empty placeholder in `.data`) and after (the class swap), in one run.
`python docs/probes/standin_cost.py`; numbers in docs/guide.md, "Inference only"."""
import timeit, torch
from torch import nn
from vzstream.hooks import bind_params, unbind_params
from vzstream.standin import adopt
shapes = [(2048,2048)]*4 + [(5632,2048)]*2 + [(2048,5632)] + [(2048,)]*2   # a tinyllama block's 9
params = [(f"p{i}", nn.Parameter(torch.zeros(s, dtype=torch.bfloat16))) for i, s in enumerate(shapes)]
views = [p.data for _, p in params]
empty = torch.empty(0, dtype=torch.bfloat16)
def old():
    for (_, p), v in zip(params, views): p.data = v
    for (_, p) in params: p.data = empty
entries = [adopt(p, n, p.device) for n, p in params]
def new(): bind_params(params, views, entries); unbind_params(params, entries)
for _ in range(3):
    for name, f in [("old (placeholder)", old), ("new (stand-in)", new)]:
        if f is old:
            bind_params(params, views, entries); [setattr(p, "__class__", nn.Parameter) for _, p in params]
        n = 50000
        print(name, f"{timeit.timeit(f, number=n) / n * 1e6:.2f} us per unit bind+release (9 params)")
        if f is old: unbind_params(params, entries)
