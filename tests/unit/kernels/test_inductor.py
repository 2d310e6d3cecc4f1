"""written_once: eager it is x itself; compiled it marks the graph and keeps every value."""

import pytest
import torch

from chunkformer.kernels.inductor import written_once


def test_written_once_is_x_itself_eager():
    x = torch.randn(2, 3, 4, 4)
    assert written_once(x) is x


def _sums_and_views(a, b, w):
    h = written_once(a * 2 + b)  # a pointwise result read by a reduction, a conv and a copy
    return h.flatten(2).sum(-1), torch.nn.functional.conv2d(h, w), h.permute(0, 2, 3, 1).contiguous() + 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_written_once_marks_the_traced_graph_and_keeps_the_values(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a = torch.randn(2, 8, 4, 4).to(memory_format=fmt)
    b, w = torch.randn_like(a), torch.randn(3, 8, 1, 1)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_sums_and_views, backend=record)(a, b, w)
    assert sum("inductor_force_stride_order" in t for t in targets) == 1
    torch._dynamo.reset()
    compiled = torch.compile(_sums_and_views)(a, b, w)  # inductor lowers the marker
    for got, want in zip(compiled, _sums_and_views(a, b, w)):
        torch.testing.assert_close(got, want)
