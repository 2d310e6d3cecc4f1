"""Budgets: tail drop counts, the ratio loss's minimum, multi-budget draws, schedules, Lite-CFG."""

import math

import pytest
import torch
from conftest import masks
from hypothesis import given
from hypothesis import strategies as st

from chunkformer import TimestepAdaptiveBudget
from chunkformer.budget import ratio_loss, tail_drop


@given(st.integers(1, 4), st.integers(2, 60), st.floats(0.0, 0.99), st.integers(0, 2**16), st.data())
def test_tail_drop_removes_exactly_floor_rho_lowest_kept(B, L, rho, seed, data):
    mask = data.draw(masks(B, L))
    mask[:, 0] = mask[:, -1] = True
    probs = torch.rand(B, L, generator=torch.Generator().manual_seed(seed))
    protected = torch.zeros_like(mask)
    protected[:, [0, -1]] = True
    out = tail_drop(probs, mask, rho)
    assert not (out & ~mask).any()  # only removes
    assert out[:, 0].all() and out[:, -1].all()  # never the first or last token
    for b in range(B):
        kept = int(mask[b].sum())
        droppable = int((mask[b] & ~protected[b]).sum())
        want = min(math.floor(kept * rho), droppable)
        dropped = mask[b] & ~out[b]
        assert int(dropped.sum()) == want
        survivors = out[b] & ~protected[b]
        if want and survivors.any():  # the dropped ones are the least probable
            assert probs[b][dropped].max() <= probs[b][survivors].min()


def test_tail_drop_per_sample_rho():
    probs = torch.linspace(0.01, 0.99, 10).repeat(3, 1)
    mask = torch.ones(3, 10, dtype=torch.bool)
    out = tail_drop(probs, mask, torch.tensor([0.0, 0.5, 0.75]))
    assert out.sum(1).tolist() == [10, 5, 3]
    assert out[1].tolist() == [True] + [False] * 5 + [True] * 4  # drops positions 1..5 (lowest p)


@given(st.floats(1.5, 16.0))
def test_ratio_loss_is_one_at_target_and_larger_elsewhere_on_diagonal(N):
    def loss_at(f):
        # F = G = f exactly: probabilities all f, a mask keeping a fraction f of 1000 tokens
        L = 1000
        k = round(f * L)
        f = k / L
        mask = torch.zeros(1, L, dtype=torch.bool)
        mask[0, :k] = True
        return ratio_loss(torch.full((1, L), f), mask, N).item(), f

    at_target, f0 = loss_at(1 / N)
    expected = N / (N - 1) * ((N - 1) * f0 * f0 + (1 - f0) ** 2)  # paper's formula at the rounded F
    assert at_target == pytest.approx(expected, abs=1e-5)
    assert at_target == pytest.approx(1.0, abs=2e-3)
    for f in (0.01, 1 / N / 2, min(0.99, 2 / N), 0.5, 0.9):
        if abs(f - 1 / N) > 0.01:
            assert loss_at(f)[0] > at_target


def test_ratio_loss_is_averaged_over_groups_of_samples():
    N = 4.0
    # group 1 (2 samples) keeps everything, group 2 keeps nothing: each group's own loss, averaged
    probs = torch.tensor([[1.0] * 8, [1.0] * 8, [0.0] * 8])
    mask = probs > 0.5
    l_full = N / (N - 1) * ((N - 1) * 1 * 1)
    l_empty = N / (N - 1) * 1.0
    assert ratio_loss(probs, mask, N, group_size=2).item() == pytest.approx((l_full + l_empty) / 2)
    pooled_f = 2 / 3
    pooled = N / (N - 1) * ((N - 1) * pooled_f**2 + (1 - pooled_f) ** 2)
    assert ratio_loss(probs, mask, N, group_size=16).item() == pytest.approx(pooled)


@given(st.integers(1, 40), st.integers(2, 12), st.integers(1, 20), st.integers(0, 2**16))
def test_ratio_loss_matches_each_group_written_out_and_dispatches_a_fixed_number_of_ops(B, L, group_size, seed):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.count += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, L, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) < 0.3
    N, each = 4.0, []
    for start in range(0, B, group_size):  # the paper's per-group loss, one group at a time
        F = mask[start:start + group_size].double().mean()
        G = probs[start:start + group_size].mean()
        each.append(N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G)))
    with Ops():
        loss = ratio_loss(probs, mask, N, group_size=group_size)
    assert loss.item() == pytest.approx(float(sum(each) / len(each)), rel=1e-6)
    assert Ops.count < 40  # one reduction for all groups: the count does not grow with B / group_size


def test_ratio_loss_gradient_flows_to_probabilities_only_through_G():
    probs = torch.rand(4, 16, requires_grad=True)
    ratio_loss(probs, probs.detach() > 0.5, 4.0).backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_multi_budget_draw_is_deterministic_per_step_and_respects_warmup():
    a = TimestepAdaptiveBudget(warmup_steps=10, seed=3)
    b = TimestepAdaptiveBudget(warmup_steps=10, seed=3)
    assert all(a.training_rho(s) == 0.0 for s in range(10))
    draws = [a.training_rho(s) for s in range(10, 400)]
    assert draws == [b.training_rho(s) for s in range(10, 400)]  # every rank agrees
    assert set(draws) == set(a.fractions)  # all fractions are used
    assert draws != [TimestepAdaptiveBudget(warmup_steps=10, seed=4).training_rho(s) for s in range(10, 400)]


def test_schedule_interpolates_between_knots_and_clamps_outside():
    budget = TimestepAdaptiveBudget(schedule=[(999, 0.6), (0, 0.0)])
    t = torch.tensor([0, 499.5, 999, 2000, -5])
    rho = budget.rho_at(t)
    assert torch.allclose(rho, torch.tensor([0.0, 0.3, 0.6, 0.6, 0.0]), atol=1e-6)
    assert torch.equal(budget.rho_at(t, rho=0.2), torch.full((5,), 0.2))
    assert torch.equal(TimestepAdaptiveBudget().rho_at(t), torch.zeros(5))


def test_lite_cfg_budgets_split_the_batch():
    rho = TimestepAdaptiveBudget(cfg_rho=(0.0, 0.9)).lite_cfg_rho(3)
    assert rho.tolist() == pytest.approx([0.0] * 3 + [0.9] * 3)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_rho_out_of_range_names_argument(bad):
    probs, mask = torch.rand(2, 8), torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rho .*\[0, 1\)|rho must be finite"):
        tail_drop(probs, mask, bad)
    with pytest.raises(ValueError, match="rho"):
        tail_drop(probs, mask, torch.tensor([0.1, bad]))


@pytest.mark.parametrize("N", [1.0, 0.5, -2.0])
def test_target_ratio_at_most_one_is_rejected(N):
    with pytest.raises(ValueError, match="target_ratio N must be > 1"):
        TimestepAdaptiveBudget(target_ratio=N)
    with pytest.raises(ValueError, match="target_ratio"):
        ratio_loss(torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool), N)


def test_bad_budget_settings_are_rejected():
    with pytest.raises(ValueError, match="fractions"):
        TimestepAdaptiveBudget(fractions=(0.0, 1.2))
    with pytest.raises(ValueError, match="cfg_rho"):
        TimestepAdaptiveBudget(cfg_rho=(0.0, 1.0))
    with pytest.raises(ValueError, match="schedule"):
        TimestepAdaptiveBudget(schedule=[(0, 0.1), (999, -0.5)])


def test_a_model_s_budget_is_configured_through_set_budget_which_validates():
    import chunkformer as cf

    model = cf.create_model("DC-DiT-S", input_size=8, num_classes=3, hidden_size=32, num_heads=2, depth=1)
    budget = model.set_budget(group_size=4, fractions=(0.0, 0.3), warmup_steps=2, seed=5)
    assert budget is model.budget and (budget.group_size, budget.warmup_steps, budget.seed) == (4, 2, 5)
    assert budget.training_rho(0) == 0.0 and {budget.training_rho(s) for s in range(2, 40)} == {0.0, 0.3}
    with pytest.raises(ValueError, match="target_ratio is fixed"):
        model.set_budget(target_ratio=8.0)
    with pytest.raises(ValueError, match="unknown budget settings"):
        model.set_budget(group=4)
    with pytest.raises(ValueError, match="group_size"):
        model.set_budget(group_size=0)
    assert model.budget.group_size == 4  # a refused setting leaves the budget as it was
