"""Issue 15, item 2: a streamed parameter outside its unit's forward is a stand-in that answers
its metadata truthfully and refuses any use of its values with StreamedWeightError. Before,
it was an empty tensor: `.sum()` gave 0, `state_dict()` empty tensors, `add_` an edit lost at
exit, `half()` a raw torch error and mixed dtypes after exit, `deepcopy` a pickling TypeError,
and a backward torch's shape error."""

import copy
import pickle

import pytest
import torch
from models import TinyLM, build

import vzstream
from vzstream import StreamedWeightError

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))


def _model():
    model = build(TinyLM, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(IDS)
    return model, ref


def _assert_exact_after(model, ref, snap):
    snap.check(model)
    with torch.no_grad():
        assert torch.equal(model(IDS), ref)


def test_a_reduction_outside_forward_raises_instead_of_reading_a_placeholder(snapshot):
    model, ref = _model()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        x = torch.ones(64, dtype=torch.bfloat16)
        with pytest.raises(StreamedWeightError, match=r"`blocks\.1\.up\.bias` is streamed"):
            x + model.blocks[1].up.bias.sum()           # before: silently x + 0
        with pytest.raises(StreamedWeightError):
            model.blocks[1].up.weight.data
        assert torch.equal(s(IDS), ref)                  # the session goes on, exact
    _assert_exact_after(model, ref, snap)


def test_metadata_stays_true_inside_a_session():
    model, _ = _model()
    before = [(n, p.shape, p.dtype, p.device, p.requires_grad, p.numel()) for n, p in model.named_parameters()]
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        inside = [(n, p.shape, p.dtype, p.device, p.requires_grad, p.numel()) for n, p in model.named_parameters()]
        assert inside == before
        assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
        assert "streamed by vzstream" in repr(model.blocks[0].up.weight)
        model.blocks[0].up.weight.requires_grad_(False)  # a flag, not a value: allowed, and kept
    assert not model.blocks[0].up.weight.requires_grad
    assert type(model.blocks[0].up.weight) is torch.nn.Parameter


def test_hf_device_dtype_and_parameter_count_are_right_inside():
    pytest.importorskip("transformers")
    from models import build_hf

    model = build_hf("llama")
    n, dtype = model.num_parameters(), model.dtype
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        assert (model.num_parameters(), model.dtype, model.device) == (n, dtype, torch.device("cpu"))


def test_state_dict_inside_raises_and_works_after(snapshot):
    model, ref = _model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        with pytest.raises(StreamedWeightError, match="state_dict"):
            model.state_dict()                           # before: empty tensors
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in expected.items())


def test_an_edit_inside_is_refused_and_nothing_is_lost(snapshot):
    model, ref = _model()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        with pytest.raises(StreamedWeightError, match="add_"):
            model.blocks[2].down.weight.add_(1)          # before: edited the placeholder, lost at exit
        with pytest.raises(StreamedWeightError):
            model.blocks[2].down.weight.data = torch.zeros(64, 128, dtype=torch.bfloat16)
        assert torch.equal(s(IDS), ref)
    _assert_exact_after(model, ref, snap)


def test_a_conversion_inside_is_refused_and_undone(snapshot):
    model, ref = _model()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        with pytest.raises(StreamedWeightError, match="half"):
            model.half()                                 # reaches the resident embedding first
        assert torch.equal(s(IDS), ref)                  # the next pass undid the part it converted
        with pytest.raises(StreamedWeightError):
            model.float()
    _assert_exact_after(model, ref, snap)               # before: mixed dtypes after exit


def test_copy_and_pickle_inside_are_refused(snapshot):
    model, ref = _model()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu") as s:
        s(IDS)
        with pytest.raises(StreamedWeightError, match="copied or pickled|deepcopy"):
            copy.deepcopy(model)                         # before: TypeError: cannot pickle '_thread.lock'
        with pytest.raises(StreamedWeightError):
            pickle.dumps(model)
        with pytest.raises(StreamedWeightError):
            copy.deepcopy(model.blocks[0].up.weight)
    _assert_exact_after(model, ref, snap)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(IDS), ref)  # and after, a copy works


def test_a_forward_with_autograd_on_is_refused_before_any_weight_moves(snapshot):
    model, ref = _model()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu") as s:
        with torch.enable_grad(), pytest.raises(StreamedWeightError, match="no_grad"):
            model(IDS).float().sum().backward()          # before: torch's own shape error
        with torch.no_grad():
            assert torch.equal(model(IDS), ref)          # the direct call under no_grad works
        assert torch.equal(s(IDS), ref)
    _assert_exact_after(model, ref, snap)
