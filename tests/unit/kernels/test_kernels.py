"""chunkformer.kernels.apply / remove: a reversible class swap that keeps parameters, state-dict keys and outputs;
the fused GELU against the plain MLP (the GPU runs are in tests/gpu/test_fast_paths.py)."""


import pytest
import torch
from backbones import OriginalLayoutDiT

import chunkformer as cf
from chunkformer import kernels
from chunkformer.kernels.gelu import Mlp as FusedMlp
from chunkformer.models.dit import Mlp


def _model(name="DC-DiT-S", seed=0, **kw):
    torch.manual_seed(seed)
    model = cf.create_model(name, input_size=16, depth=2, **kw).eval()
    with torch.no_grad():  # zero-init layers would hide the decoder and the blocks
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1))
    return model


def _inputs(B=2, side=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, side, side, generator=g), torch.tensor([10, 900][:B]), torch.tensor([1, 2][:B])


def _layer_types(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_apply_on_a_cpu_model_warns_and_changes_nothing():
    model = _model()
    before = _layer_types(model)
    with pytest.warns(UserWarning, match="no parameter on CUDA"):
        assert kernels.apply(model) == {}
    assert _layer_types(model) == before


@pytest.mark.parametrize("name", ["DC-DiT-S", "DiT-S/2"])
def test_apply_and_remove_keep_parameters_keys_and_outputs_and_undo_every_swap(name):
    """Forced on the CPU, where no fast path's conditions hold: the patched model is the plain one, exactly."""
    model = _model(name)
    x, t, y = _inputs()
    before, params = _layer_types(model), dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x, t, y, rho=0.2) if name.startswith("DC") else model(x, t, y)
    counts = kernels.apply(model, force=True)
    expected = {"norms": 10, "gemm": 4, "gelu": 2, "attention": 2} if name.startswith("DC") else \
        {"gelu": 2, "attention": 2}
    assert counts == expected == kernels.applied(model)
    assert _layer_types(model) != before
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors, not copies
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        out = model(x, t, y, rho=0.2) if name.startswith("DC") else model(x, t, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert kernels.apply(model, force=True) == counts  # again: removes the earlier patch first
    # DC-DiT also swaps its 4 ResBlocks, its encoder and the router's SiLU (fused into the norm before it)
    assert kernels.remove(model) == sum(counts.values()) + (6 if name.startswith("DC") else 0)
    assert _layer_types(model) == before and kernels.applied(model) == {}
    assert kernels.remove(model) == 0
    model.load_state_dict(state)  # the plain model takes the patched model's checkpoints and vice versa


def test_a_patched_model_trains_on_the_plain_paths_and_counts_the_same_flops():
    model = _model()
    x, t, y = _inputs()
    flops = cf.count_flops(model, x, t, y).total
    model.train()
    plain_out = model(x, t, y, rho=0.2)
    plain_out.square().mean().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    kernels.apply(model, force=True)
    out = model(x, t, y, rho=0.2)
    out.square().mean().backward()
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for n, p in model.named_parameters():
        if n in plain_grads:
            torch.testing.assert_close(p.grad, plain_grads[n], rtol=0, atol=0)
    assert cf.count_flops(model.eval(), x, t, y).total == flops
    assert "use_kernel" not in model.decoder.blocks[0].norm1.__dict__  # the counter left the settings as it found them


def test_apply_patches_a_wrapped_original_layout_dit_and_keeps_its_outputs():
    torch.manual_seed(0)
    w = cf.wrap(OriginalLayoutDiT()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = w(x, t, y, rho=0.3)
        counts = kernels.apply(w, force=True)
        assert counts["gelu"] == counts["attention"] == 2 and counts["norms"] > 0
        torch.testing.assert_close(w(x, t, y, rho=0.3), ref, rtol=0, atol=0)
    kernels.remove(w)


def test_mlp_fuses_its_gelu_only_when_sampling_on_a_gpu_in_half_precision():
    mlp = Mlp(8, 32)
    kernels.apply(torch.nn.Sequential(mlp), force=True)
    assert isinstance(mlp, FusedMlp)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert not mlp.takes_epilogue(x)  # CPU
        assert not mlp.takes_epilogue(x.to("meta"))  # the FLOP counter's meta tensors: no autocast to ask
    assert mlp.state_dict().keys() == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # checkpoints unchanged
    with pytest.raises(ValueError, match="no kernel Mlp"):
        kernels.set_fused_gelu(torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.GELU()), False)
    if torch.cuda.is_available():  # pragma: no cover - GPU runs only
        m, xc = mlp.cuda(), x.cuda()
        assert not m.takes_epilogue(xc.bfloat16())  # grad enabled: training keeps the two ops
        with torch.no_grad():
            assert m.bfloat16().takes_epilogue(xc.bfloat16())
            assert not m.float().takes_epilogue(xc)  # fp32 without autocast
            with torch.autocast("cuda", dtype=torch.bfloat16):
                assert m.takes_epilogue(xc)
            m.use_kernel = False
            assert not m.bfloat16().takes_epilogue(xc.bfloat16())


@pytest.mark.parametrize("shape", [(2, 5, 48), (7, 48)])  # dense (B, L, d) and packed (T, d) tokens
def test_the_fused_gelu_path_keeps_every_layouts_shape_and_values(monkeypatch, shape):
    """Forced on (on the CPU gelu_linear falls back to its two ops)."""
    torch.manual_seed(0)
    mlp = Mlp(48, 192).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = mlp(x)
        kernels.apply(torch.nn.Sequential(mlp), force=True)
        monkeypatch.setattr(FusedMlp, "takes_epilogue", lambda self, x: self.use_kernel)
        out = mlp(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
