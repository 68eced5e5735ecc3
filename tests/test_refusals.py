"""Refusals at open (issue 15, items 6 and 7): a model that a session would give back changed
(a strided, expanded or storage-sharing parameter), or would fail on later with a raw torch error
(a ModuleList named as a unit, meta or uninitialised lazy parameters), is refused by
`vzstream.session(...)` with a `VzstreamError` naming what and the fix. The refused model is left
exactly as it was (values, strides, storages) with no session open, and opens once fixed.

The public-API tests use only `vzstream.session` and the error classes, so they also run against
an older tree; `check_model` itself is tested at the end.
"""

import pytest
import torch
from models import Stack, build, make_input
from torch import nn

import vzstream


def _randn(*shape: int) -> torch.Tensor:
    return make_input(*shape, seed=7)


def _fingerprint(model: nn.Module) -> tuple[dict, dict]:
    """Every parameter and buffer under every name: identity, type, and, when it has data, its
    device, dtype, shape, strides and storage (address, size, offset); and its values."""
    meta, values = {}, {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            meta[name] = (id(t), type(t))
        elif t.is_meta:
            meta[name] = (id(t), type(t), tuple(t.shape), t.stride(), t.dtype)
        else:
            storage = t.untyped_storage()
            meta[name] = (id(t), type(t), t.device, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(),
                          storage.data_ptr(), storage.nbytes())
            values[name] = t.detach().clone()
    return meta, values


def _assert_unchanged(model: nn.Module, before: tuple[dict, dict]) -> None:
    meta, values = _fingerprint(model)
    assert meta == before[0], "a parameter or buffer was replaced, moved or changed layout"
    for name, value in before[1].items():
        assert torch.equal(values[name], value), f"`{name}` changed value"


def _layout(model: nn.Module) -> dict:
    """name -> (strides, storage offset, storage bytes, first name sharing its storage)."""
    first, out = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = p.untyped_storage().data_ptr()
        first.setdefault(key, name)
        out[name] = (p.stride(), p.storage_offset(), p.untyped_storage().nbytes(), first[key])
    return out


def _opens_and_runs(model: nn.Module, snapshot, open_models, **options) -> None:
    """The (fixed) model opens, runs bit-exact twice and comes back as it was, layout included."""
    assert model not in open_models, "the refused open left the model registered as open"
    x = make_input(2, 64)
    with torch.no_grad():
        ref = model(x)
    snap, layout = snapshot(model), _layout(model)
    with vzstream.session(model, device="cpu", **options) as s:
        assert torch.equal(s(x), ref) and torch.equal(s(x), ref)
    snap.check(model)
    assert _layout(model) == layout


def _open_and_close(model: nn.Module, **options) -> None:
    """Open a session and leave it at once (closed even when an older tree fails to refuse)."""
    with vzstream.session(model, device="cpu", **options):
        pass


def _clone_dense(*params: nn.Parameter) -> None:
    for p in params:
        p.data = p.data.clone(memory_format=torch.contiguous_format)


# -- item 6: parameters a restore would give back with another layout --------------------------

def _strided(model):        # a `big[:, ::2]` weight: strides (128, 2)
    model.blocks[1].up.weight = nn.Parameter(_randn(128, 128)[:, ::2])
    return [model.blocks[1].up.weight], ["`blocks.1.up.weight`", r"strides \(128, 2\)"]


def _expanded(model):       # 128 stored elements read as 8192
    model.blocks[1].up.weight = nn.Parameter(_randn(128, 1).expand(128, 64))
    return [model.blocks[1].up.weight], ["`blocks.1.up.weight`", "expanded", "128 stored elements read as 8192"]


def _views_of_one_tensor(model):
    big = _randn(256, 64)
    model.blocks[1].up.weight.data, model.blocks[2].up.weight.data = big[:128], big[128:]
    params = [model.blocks[1].up.weight, model.blocks[2].up.weight]
    return params, ["`blocks.1.up.weight`", "`blocks.2.up.weight`", "shares its storage with `blocks.1.up.weight`"]


def _two_parameters_one_storage(model):   # distinct Parameter objects over one tensor: not a tie
    model.blocks[2].up.weight = nn.Parameter(model.blocks[1].up.weight.data)
    return [model.blocks[2].up.weight], ["`blocks.2.up.weight`", "shares its storage with `blocks.1.up.weight`"]


def _view_into_larger(model):
    model.blocks[1].up.weight = nn.Parameter(_randn(256, 64)[:128])
    return [model.blocks[1].up.weight], ["`blocks.1.up.weight`", "a view"]


LAYOUTS = [
    pytest.param(_strided, id="strided"),
    pytest.param(_expanded, id="expanded"),
    pytest.param(_views_of_one_tensor, id="views_of_one_tensor"),
    pytest.param(_two_parameters_one_storage, id="two_parameters_one_storage"),
    pytest.param(_view_into_larger, id="view_into_larger_tensor"),
]


@pytest.mark.parametrize("unusual", LAYOUTS)
def test_a_parameter_with_an_unusual_layout_is_refused_at_open(unusual, snapshot, open_models):
    model = build(Stack)
    params, fragments = unusual(model)
    before = _fingerprint(model)
    with pytest.raises(vzstream.TraceError) as err:
        _open_and_close(model)
    for fragment in fragments + [r"clone\(memory_format=torch.contiguous_format\)"]:
        assert err.match(fragment)
    _assert_unchanged(model, before)
    _clone_dense(*params)
    _opens_and_runs(model, snapshot, open_models)


def _transposed(model):
    model.blocks[1].up.weight = nn.Parameter(_randn(64, 128).t())


def _permuted_3d(model):    # an extra (unused) weight, a dense permutation of a 3-D block
    model.blocks[1].extra = nn.Parameter(_randn(4, 8, 16).permute(2, 0, 1))


def _tied(model):           # one Parameter under two names
    model.blocks[2].down.weight = model.blocks[1].down.weight


@pytest.mark.parametrize("layout", [_transposed, _permuted_3d, _tied], ids=["transposed", "permuted_3d", "tied"])
@pytest.mark.parametrize("units", ["blocks", "leaves"])
def test_dense_permutations_and_tied_parameters_still_open_and_come_back_exactly(layout, units, snapshot, open_models):
    model = build(Stack)
    layout(model)
    _opens_and_runs(model, snapshot, open_models, units=units)
    if layout is _tied:
        assert model.blocks[2].down.weight is model.blocks[1].down.weight


# -- item 7: what used to fail later with a raw torch error -----------------------------------

def test_a_module_list_named_as_a_unit_is_refused(snapshot, open_models):
    model = build(Stack)
    before = _fingerprint(model)
    with pytest.raises(vzstream.ConfigError) as err:        # was: a raw shape error inside forward
        _open_and_close(model, units=["blocks"])
    for fragment in ["`blocks`", "ModuleList", "no forward", "'blocks.0', 'blocks.1', 'blocks.2', ...",
                     "units='blocks'"]:
        assert fragment in str(err.value)
    _assert_unchanged(model, before)
    _opens_and_runs(model, snapshot, open_models, units=[f"blocks.{i}" for i in range(4)])


class ScaledBlocks(nn.Module):
    """A Stack whose output is scaled by a ParameterList entry, read by the parent's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = Stack()
        self.scales = nn.ParameterList([nn.Parameter(torch.full((64,), 0.5))])

    def forward(self, x):
        return self.stack(x) * self.scales[0]


def test_leaves_refuses_a_parameter_list_that_is_never_called(snapshot, open_models):
    model = build(ScaledBlocks)
    before = _fingerprint(model)
    with pytest.raises(vzstream.ConfigError) as err:
        _open_and_close(model, units="leaves")
    assert err.match("`scales`") and err.match("no forward")
    _assert_unchanged(model, before)
    _opens_and_runs(model, snapshot, open_models, units="blocks")


@pytest.mark.parametrize("units", [
    pytest.param("blocks", id="streamed"),                  # was: a ConfigError from packing, half-way through open
    pytest.param(["blocks.0"], id="resident"),              # was: NotImplementedError from torch
])
def test_meta_parameters_are_refused_naming_them(units, snapshot, open_models):
    model = build(Stack)
    weights = model.blocks[1].up.state_dict()
    model.blocks[1].up.to(device="meta")
    before = _fingerprint(model)
    with pytest.raises(vzstream.TraceError) as err:
        _open_and_close(model, units=units)
    assert err.match("meta") and err.match("`blocks.1.up.weight`, `blocks.1.up.bias`") and err.match("[Ll]oad")
    _assert_unchanged(model, before)
    model.blocks[1].up.to_empty(device="cpu").load_state_dict(weights)
    _opens_and_runs(model, snapshot, open_models, units=units)


def test_a_meta_buffer_is_refused_naming_it(snapshot, open_models):
    model = build(Stack)
    model.register_buffer("offset", torch.zeros(64, device="meta"))
    before = _fingerprint(model)
    with pytest.raises(vzstream.TraceError, match="meta.*`offset`"):
        _open_and_close(model)
    _assert_unchanged(model, before)
    model.offset = torch.zeros(64)
    _opens_and_runs(model, snapshot, open_models)


def test_an_uninitialised_lazy_module_is_refused_until_a_forward_has_run(snapshot, open_models):
    model = build(Stack)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.blocks[1].up = nn.LazyLinear(128)
    before = _fingerprint(model)
    with pytest.raises(vzstream.TraceError) as err:         # was: ValueError from torch
        _open_and_close(model)
    assert err.match("`blocks.1.up.weight`, `blocks.1.up.bias`") and err.match("forward")
    _assert_unchanged(model, before)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model(make_input(2, 64))                            # initialises the lazy weights
    _opens_and_runs(model, snapshot, open_models)


# -- check_model itself ------------------------------------------------------------------------

@pytest.fixture
def check_model():
    return pytest.importorskip("vzstream.checks").check_model


def _with_module_dict(model):
    model.blocks[0].inner = nn.ModuleDict({"a": nn.Linear(2, 2)})
    return model


@pytest.mark.parametrize("unusual", LAYOUTS)
def test_check_model_refuses_each_unusual_layout_and_changes_nothing(unusual, check_model):
    model = build(Stack)
    unusual(model)
    before = _fingerprint(model)
    with pytest.raises(vzstream.TraceError):
        check_model(model, "blocks")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("layout", [_transposed, _permuted_3d, _tied], ids=["transposed", "permuted_3d", "tied"])
def test_check_model_accepts_dense_permutations_and_ties(layout, check_model):
    model = build(Stack)
    layout(model)
    assert check_model(model, "blocks") is None


def test_check_model_names_three_parameters_then_counts_the_rest(check_model):
    model = build(Stack)
    for block in model.blocks:
        block.up.weight = nn.Parameter(_randn(128, 128)[:, ::2])
    with pytest.raises(vzstream.TraceError, match=r"`blocks.2.up.weight` \(strides .*\) and 1 more\. ") as err:
        check_model(model, "blocks")
    assert "blocks.3" not in str(err.value)


def test_check_model_refuses_a_size_one_dim_with_a_stride_a_restore_would_not_keep(check_model):
    model = build(Stack)
    model.blocks[1].col = nn.Parameter(_randn(1, 16).as_strided((16, 1), (1, 16)))   # is_contiguous() is True
    with pytest.raises(vzstream.TraceError,
                       match=r"strides \(1, 16\) for shape \(16, 1\), would come back as \(1, 1\)"):
        check_model(model, "blocks")


@pytest.mark.parametrize("spec, fragment", [
    (("blocks.0.inner",), "ModuleDict"),
    (("blocks",), "ModuleList"),
], ids=["module_dict", "module_list"])
def test_check_model_refuses_unit_modules_without_a_forward(spec, fragment, check_model):
    with pytest.raises(vzstream.ConfigError, match=fragment):
        check_model(_with_module_dict(build(Stack)), spec)


@pytest.mark.parametrize("spec", ["blocks", "leaves", ("blocks.0", "blocks.1"), ("no.such.module",)],
                         ids=["blocks", "leaves", "children", "unknown_name_left_to_find_units"])
def test_check_model_accepts_units_whose_modules_run(spec, check_model):
    assert check_model(build(Stack), spec) is None


def test_check_model_accepts_a_module_given_a_forward_of_its_own(check_model):
    model = build(Stack)
    model.blocks.forward = lambda x: x           # an instance forward runs, and so do its hooks
    assert check_model(model, ("blocks",)) is None


def test_check_model_reports_lazy_before_meta_before_units_before_layout(check_model):
    model = build(Stack)
    _strided(model)
    with pytest.raises(vzstream.ConfigError):
        check_model(model, ("blocks",))
    model.blocks[2].up.to(device="meta")
    with pytest.raises(vzstream.TraceError, match="meta"):
        check_model(model, ("blocks",))
    model.blocks[3].up = nn.LazyLinear(128)
    with pytest.raises(vzstream.TraceError, match="lazy"):
        check_model(model, ("blocks",))


# -- issue 15, item 10: compilers and other owners of the model ---------------------------------

def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)]), _randn(2, 16)


@pytest.mark.filterwarnings("ignore")             # Dynamo warns about what it cannot trace
@pytest.mark.parametrize("what", ["model", "session_call"])
def test_torch_compile_of_a_streamed_model_is_refused_at_the_call(what):
    """Compiled, the hooks run between graphs, every unit a graph break (13 graphs for 3 units,
    tried): refused with a TraceError at the call, and the session goes on exactly."""
    model, x = _tiny()
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", units=["0", "1", "2"]) as s, torch.no_grad():
        s(x)
        compiled = torch.compile(model if what == "model" else (lambda x: s(x)), backend="eager")
        with pytest.raises(vzstream.TraceError, match="torch.compile"):
            compiled(x)
        assert torch.equal(s(x), ref) and torch.equal(model(x), ref)


def test_a_cuda_graph_capture_of_a_streamed_model_is_refused_at_the_call(monkeypatch):
    model, x = _tiny()
    with vzstream.session(model, device="cpu", units=["0", "1", "2"]) as s, torch.no_grad():
        ref = s(x)
        for name in ("is_available", "is_initialized", "is_current_stream_capturing"):
            monkeypatch.setattr(torch.cuda, name, lambda: True)
        with pytest.raises(vzstream.TraceError, match="CUDA graph"):
            s(x)
        monkeypatch.undo()
        assert torch.equal(s(x), ref)


@pytest.mark.parametrize("how", ["hooks", "device_map"])
def test_a_model_placed_by_accelerate_is_refused_at_open(how):
    """accelerate's hooks (`cpu_offload`, `device_map=`) would move the same weights as the
    session: refused at open, the model untouched."""
    model, x = _tiny()
    if how == "hooks":
        model[1]._hf_hook = object()              # what accelerate.hooks.add_hook_to_module sets
    else:
        model.hf_device_map = {"0": 0, "1": "cpu", "2": "disk"}
    before = _fingerprint(model)
    with pytest.raises(vzstream.TraceError, match="accelerate"):
        vzstream.session(model, device="cpu").open()
    _assert_unchanged(model, before)
    model.hf_device_map = {"": 0}                 # one device: nothing to fight over
    if how == "hooks":
        del model[1]._hf_hook
    with vzstream.session(model, device="cpu"):
        pass
