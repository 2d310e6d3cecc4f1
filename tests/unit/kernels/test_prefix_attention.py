"""chunkformer.kernels.prefix_attention: the block mask built from lengths is the mask FlexAttention's own
builder makes, the attention is SDPA's with the same key mask (forward here: FlexAttention has no CPU backward;
tests/gpu compares gradients), it traces into a compiled graph, and it is taken only where it should be."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkformer.kernels import prefix_attention as prefix
from chunkformer.kernels import short_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _lengths(data, batch, slots):
    return torch.tensor(data.draw(st.lists(st.integers(1, slots), min_size=batch, max_size=batch)))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), batch=st.integers(1, 4), slots=st.integers(1, 400), block=st.sampled_from([16, 128]))
def test_the_block_mask_from_lengths_is_flex_attentions_own(data, batch, slots, block):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = _lengths(data, batch, slots)
    ours = prefix.prefix_block_mask(lengths, slots, block)
    theirs = create_block_mask(lambda b, h, q, kv: kv < lengths[b], batch, None, slots, slots, device="cpu",
                               BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    # the partial / full split: a block counts as full only when every key in it is valid
    assert torch.equal(ours.full_kv_num_blocks[:, 0, 0], (lengths // block).to(torch.int32))


@settings(max_examples=15, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), slots=st.integers(1, 300), heads=st.integers(1, 3))
def test_prefix_attention_is_sdpa_with_the_key_mask(data, batch, slots, heads):
    lengths = _lengths(data, batch, slots)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(batch, heads, slots, 16, generator=g) for _ in range(3))
    keep = (torch.arange(slots) < lengths[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    out = prefix.prefix_attention(q, k, v, prefix.prefix_lengths(keep))
    assert torch.allclose(out, ref, atol=1e-5)
    short = torch.tensor([max(1, n - 1) for n in lengths.tolist()])  # one key fewer changes the answer
    if (short != lengths).any():
        assert not torch.allclose(prefix.prefix_attention(q, k, v, short), ref, atol=1e-5)


def test_prefix_attention_traces_into_a_compiled_graph():
    """No graph break: the block mask is built from the lengths inside the graph (aot_eager: no CPU codegen)."""
    import torch._dynamo as dynamo

    lengths = torch.tensor([70, 3])
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    dynamo.reset()
    dynamo.utils.counters.clear()
    out = torch.compile(prefix.prefix_attention, backend="aot_eager", fullgraph=True)(q, k, v, lengths)
    keep = (torch.arange(70) < lengths[:, None])[:, None, None]
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-5)
    dynamo.reset()


@pytest.mark.parametrize("change, taken", [
    ({}, True), (dict(enabled=False), False), (dict(mask="none"), False), (dict(mask="float"), False),
    (dict(grad=False), False), (dict(compiling=False), False), (dict(device="cpu"), False)])
def test_the_prefix_path_is_taken_only_where_it_should_be(monkeypatch, change, taken):
    case = dict(enabled=True, mask="bool", grad=True, compiling=True, device="cuda") | change
    monkeypatch.setattr(prefix, "_enabled", case["enabled"])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: case["compiling"])
    q = torch.randn(2, 2, 8, 16, requires_grad=case["grad"])
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: case["device"] == "cuda"))
    keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask = {"none": None, "bool": keep, "float": keep.float()}[case["mask"]]
    assert prefix.runs_here(q, mask) is taken


def test_the_attention_fast_path_sends_masked_compiled_training_calls_through_it(monkeypatch):
    seen = []
    monkeypatch.setattr(prefix, "runs_here", lambda q, mask: True)
    monkeypatch.setattr(prefix, "prefix_attention", lambda q, k, v, lengths: seen.append(lengths.tolist()) or q)
    keep = (torch.arange(8) < torch.tensor([8, 5])[:, None])[:, None, None]
    q = torch.randn(2, 2, 8, 16)
    assert short_attention.sdpa(q, q, q, keep) is q and seen == [[8, 5]]
