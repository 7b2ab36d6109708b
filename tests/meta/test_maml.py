"""The MAML core against independent computations (finite differences, closed forms), and the MetaModel
that wraps it: the same numbers, keyed by its own parameter names, saved as a plain state dict."""

import pytest
import torch
from torch import nn

from distmeta.meta.maml import MetaModel, adapt, batched_meta_gradients, meta_gradients


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def ce(logits, targets):
    return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()


@pytest.fixture
def setting():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.softmax(torch.randn(6, 2, dtype=torch.float64), -1)
    x2, y2 = torch.randn(5, 3, dtype=torch.float64), torch.softmax(torch.randn(5, 2, dtype=torch.float64), -1)
    lrs = {n: torch.tensor([0.3, 0.2, 0.25], dtype=torch.float64) for n, _ in model.named_parameters()}
    return model, (x, y), (x2, y2), lrs


def _meta_loss(model, inner, outer, lrs, steps):
    """The outer loss as a plain function of the parameters and rates (second order by construction)."""
    return meta_gradients(model, ce, inner, outer, lrs=lrs, steps=steps, second_order=True)[0].item()


@pytest.mark.parametrize("csmt", [True, False])
def test_second_order_matches_finite_differences(setting, csmt):
    model, inner, outer, lrs = setting
    outer = None if csmt else outer
    _, grads, rate_grads = meta_gradients(model, ce, inner, outer, lrs=lrs, steps=3, second_order=True)
    eps = 1e-6
    for name, param in model.named_parameters():
        flat = param.data.view(-1)
        for i in range(0, flat.numel(), 3):
            old = flat[i].item()
            flat[i] = old + eps
            up = _meta_loss(model, inner, outer, lrs, 3)
            flat[i] = old - eps
            down = _meta_loss(model, inner, outer, lrs, 3)
            flat[i] = old
            assert grads[name].view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    for name in lrs:  # LSLR gradients, one rate per step
        for step in range(3):
            shifted = {n: v.clone() for n, v in lrs.items()}
            shifted[name][step] += eps
            up = _meta_loss(model, inner, outer, shifted, 3)
            shifted[name][step] -= 2 * eps
            down = _meta_loss(model, inner, outer, shifted, 3)
            assert rate_grads[name][step].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


class Quadratic(nn.Module):
    """L(theta) = 1/2 theta^T A theta - b^T theta; the 'model' returns theta, the loss does the rest."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, inputs):
        return self.theta


def test_quadratic_closed_form():
    torch.manual_seed(1)
    m = torch.randn(4, 4, dtype=torch.float64)
    A, b = m @ m.T + torch.eye(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    loss = lambda theta, _: 0.5 * theta @ A @ theta - b @ theta  # noqa: E731
    theta = torch.randn(4, dtype=torch.float64)
    a = 0.05
    model = Quadratic(theta.clone())
    lrs = {"theta": torch.tensor([a], dtype=torch.float64)}
    theta1 = theta - a * (A @ theta - b)
    grad_at_1 = A @ theta1 - b
    _, second, second_rate = meta_gradients(model, loss, (None, None), lrs=lrs, steps=1, second_order=True)
    assert torch.allclose(second["theta"], (torch.eye(4, dtype=torch.float64) - a * A).T @ grad_at_1)
    _, first, first_rate = meta_gradients(model, loss, (None, None), lrs=lrs, steps=1, second_order=False)
    assert torch.allclose(first["theta"], grad_at_1)
    # d L(theta1) / d a = grad L(theta1) . d theta1 / d a = -grad L(theta1) . grad L(theta)
    expected_lr = -grad_at_1 @ (A @ theta - b)
    assert torch.allclose(second_rate["theta"], expected_lr.reshape(1))
    assert torch.allclose(first_rate["theta"], expected_lr.reshape(1))


def test_first_order_is_the_outer_gradient_at_the_adapted_parameters(setting):
    model, inner, outer, lrs = setting
    _, grads, _ = meta_gradients(model, ce, inner, outer, lrs=lrs, steps=3, second_order=False)
    # independent: plain SGD on copies with the same rates, then the outer gradient there
    twin = MLP().double()
    twin.load_state_dict(model.state_dict())
    for step in range(3):
        twin.zero_grad()
        ce(twin(inner[0]), inner[1]).backward()
        with torch.no_grad():
            for name, p in twin.named_parameters():
                p -= lrs[name][step] * p.grad
    twin.zero_grad()
    ce(twin(outer[0]), outer[1]).backward()
    for name, p in twin.named_parameters():
        assert torch.allclose(grads[name], p.grad)


def test_frozen_parameters_stay_fixed_and_rates_extend(setting):
    model, inner, outer, lrs = setting
    model.a.weight.requires_grad_(False)
    _, grads, rate_grads = meta_gradients(model, ce, inner, outer, lrs=lrs, steps=5, second_order=True)
    assert "a.weight" not in grads and "a.weight" not in rate_grads
    trajectory = adapt(model, ce, inner, lrs=lrs, steps=5)
    assert all("a.weight" not in p for p in trajectory)
    # steps 3 and 4 reuse the last rate: the same as a 5-entry vector ending in that rate twice
    longer = {n: torch.cat([v, v[-1:].repeat(2)]) for n, v in lrs.items()}
    again = adapt(model, ce, inner, lrs=longer, steps=5)
    assert all(torch.equal(trajectory[-1][n], again[-1][n]) for n in trajectory[-1])
    with pytest.raises(KeyError, match="no learning rates"):
        meta_gradients(model, ce, inner, lrs={}, steps=1, second_order=False)


def test_multi_step_loss_is_the_weighted_sum(setting):
    model, inner, outer, lrs = setting
    weights = [0.2, 0.3, 0.5]
    loss, grads, _ = meta_gradients(model, ce, inner, outer, lrs=lrs, steps=3, second_order=True, step_weights=weights)
    parts = [meta_gradients(model, ce, inner, outer, lrs=lrs, steps=k, second_order=True) for k in (1, 2, 3)]
    assert loss.item() == pytest.approx(sum(w * p[0].item() for w, p in zip(weights, parts)))
    for name in grads:
        assert torch.allclose(grads[name], sum(w * p[1][name] for w, p in zip(weights, parts)))


class DropoutMLP(MLP):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


@pytest.mark.parametrize("csmt,weights", [(True, None), (False, None), (False, [0.2, 0.3, 0.5])])
def test_recomputed_second_order_equals_the_one_graph_dropout_and_random_state_included(setting, csmt, weights):
    """recompute=True rebuilds each inner step's graph in the backward pass: the same outer loss, meta-gradients
    and rate gradients as keeping every step's graph, with dropout drawing the same masks, and the random
    state left where the one-graph computation leaves it."""
    _, inner, outer, lrs = setting
    torch.manual_seed(3)
    model = DropoutMLP().double()
    results, after = [], []
    for recompute in (False, True):
        torch.manual_seed(7)
        results.append(meta_gradients(model, ce, inner, None if csmt else outer, lrs=lrs, steps=3, second_order=True,
                                      step_weights=weights, recompute=recompute))
        after.append(torch.rand(3))
    (loss, grads, rates), (loss2, grads2, rates2) = results
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    for name in grads:
        assert torch.allclose(grads2[name], grads[name], rtol=1e-10, atol=1e-12), name
        assert torch.allclose(rates2[name], rates[name], rtol=1e-10, atol=1e-12), name
    assert torch.equal(after[0], after[1])
    assert not torch.allclose(meta_gradients(model, ce, inner, outer, lrs=lrs, steps=3, second_order=False)[1]["a.weight"],
                              grads["a.weight"])  # second order differs from first: the check can fail


def test_recomputed_meta_gradients_through_the_real_upstream_equal_the_one_graph(assert_near):
    """The same through the SER model with scope entire (the upstream's attention and dropout)."""
    from distmeta.models import SERModel, Upstream, UpstreamConfig, set_scope

    torch.manual_seed(0)
    model = set_scope(SERModel(Upstream(UpstreamConfig())), "entire").train()
    inputs = {"wavs": torch.randn(2, 8000) * 0.1, "lengths": torch.tensor([8000, 6000])}
    targets = torch.tensor([[1.0] + [0.0] * 8, [0.0, 1.0] + [0.0] * 7])
    lrs = {n: torch.tensor([1e-3, 2e-3]) for n, p in model.named_parameters() if p.requires_grad}
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        results.append(meta_gradients(model, ce, (inputs, targets), lrs=lrs, steps=2, second_order=True, recompute=recompute))
    assert_near(results[1], results[0], what="recomputed ")


def test_meta_gradients_through_the_real_upstream_on_the_device_equal_the_cpus(device, assert_near):
    """First and second order through the SER model (the upstream's attention included: its fused kernels,
    on the CPU and on CUDA, have no double backward, so the core picks the math one), on `--device` and on
    the CPU from the same weights and audio."""
    from distmeta.models import SERModel, Upstream, UpstreamConfig, set_scope

    torch.manual_seed(0)
    model = set_scope(SERModel(Upstream(UpstreamConfig())), "entire")
    inputs = {"wavs": torch.randn(2, 8000) * 0.1, "lengths": torch.tensor([8000, 6000])}
    targets = torch.tensor([[1.0] + [0.0] * 8, [0.0, 1.0] + [0.0] * 7])
    lrs = {n: torch.tensor([1e-3, 2e-3]) for n, p in model.named_parameters() if p.requires_grad}
    there = model.clone().to(device)
    results = {}
    for second_order in (False, True):
        reference = meta_gradients(model, ce, (inputs, targets), lrs=lrs, steps=2, second_order=second_order)
        ours = meta_gradients(there, ce, (inputs, targets.to(device)), lrs={n: r.to(device) for n, r in lrs.items()},
                              steps=2, second_order=second_order)
        assert_near(ours, reference, what=f"{'second' if second_order else 'first'} order ")
        results[second_order] = reference
    name = "head.classifier.weight"
    assert results[True][1][name].abs().sum() > 0 and not torch.equal(results[True][1][name], results[False][1][name])


def test_meta_model_is_the_core_keyed_by_its_own_parameters(setting):
    model, inner, outer, lrs = setting
    model.a.weight.requires_grad_(False)  # a scope: frozen parameters get neither rates nor gradients
    meta = MetaModel(model, inner_steps=3, inner_lr=0.0, loss_fn=ce).double()
    with torch.no_grad():
        for name, rates in meta.learning_rates().items():
            rates.copy_(lrs[name])
    loss, grads = meta.meta_gradients(inner, outer, steps=3, second_order=True)
    expected_loss, expected, expected_rates = meta_gradients(model, ce, inner, outer, lrs=lrs, steps=3, second_order=True)
    assert loss.item() == expected_loss.item()
    assert set(grads) == {n for n, p in meta.named_parameters() if p.requires_grad}
    assert set(grads) == {"model.a.bias", "model.b.weight", "model.b.bias", "rates.a/bias", "rates.b/weight", "rates.b/bias"}
    for name in expected:
        assert torch.equal(grads[f"model.{name}"], expected[name])
        assert torch.equal(grads[f"rates.{name.replace('.', '/')}"], expected_rates[name])
    meta.rates.requires_grad_(False)  # without LSLR the rates are not meta-parameters
    assert {n for n in meta.meta_gradients(inner, outer, steps=3, second_order=False)[1]} == {
        "model.a.bias", "model.b.weight", "model.b.bias"}


def test_meta_model_adapts_with_its_rates_and_round_trips_as_a_state_dict(setting):
    model, inner, _, lrs = setting
    meta = MetaModel(model, inner_steps=3, inner_lr=0.0, loss_fn=ce).double()
    with torch.no_grad():
        for name, rates in meta.learning_rates().items():
            rates.copy_(lrs[name])
    fast = meta.adapt(*inner, steps=3)
    expected = adapt(model, ce, inner, lrs=lrs, steps=3)[-1]
    assert all(torch.equal(fast[n], expected[n].detach()) for n in expected)
    assert torch.equal(meta(inner[0], fast), torch.func.functional_call(model, expected, (inner[0],)))
    twin = MLP().double()
    again = MetaModel(twin, inner_steps=3, inner_lr=0.5, loss_fn=ce).double()
    again.load_state_dict(meta.state_dict())  # an ordinary state dict: model.<name>, rates.<name>
    assert all(torch.equal(again.adapt(*inner, steps=3)[n], fast[n]) for n in fast)


@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("csmt", [True, False])
def test_batched_meta_gradients_equal_each_task_on_its_own(setting, second_order, csmt):
    # What the trainers run on pooled features: several tasks in one vmap; the reference is the loop.
    model, _, _, lrs = setting
    torch.manual_seed(1)
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.softmax(torch.randn(6, 2, dtype=torch.float64), -1))
               for _ in range(5)]
    inner, outer = batches[:3], None if csmt else batches[2:]
    for weights in (None, [0.2, 0.3, 0.5]):
        got = batched_meta_gradients(model, ce, inner, outer, lrs=lrs, steps=3, second_order=second_order,
                                     step_weights=weights)
        assert len(got) == 3
        for t, (loss, grads, rate_grads) in enumerate(got):
            expected_loss, expected, expected_rates = meta_gradients(
                model, ce, inner[t], None if csmt else outer[t], lrs=lrs, steps=3, second_order=second_order,
                step_weights=weights)
            assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
            for name in expected:
                assert torch.allclose(grads[name], expected[name], rtol=1e-10, atol=1e-12), (t, name)
                assert torch.allclose(rate_grads[name], expected_rates[name], rtol=1e-10, atol=1e-12), (t, name)
    # the rates' gradients are not zero (the comparison above would pass on two empty computations)
    assert any(g.abs().sum() > 0 for g in got[0][2].values())


def test_meta_model_batched_adapt_and_gradients_equal_its_single_ones(setting):
    model, inner, outer, lrs = setting
    model.a.weight.requires_grad_(False)
    meta = MetaModel(model, inner_steps=3, inner_lr=0.0, loss_fn=ce).double()
    with torch.no_grad():
        for name, rates in meta.learning_rates().items():
            rates.copy_(lrs[name])
    batches = [inner, (inner[0] * 2, inner[1].flip(-1))]
    for fast, batch in zip(meta.batched_adapt(batches, steps=3), batches):
        expected = meta.adapt(*batch, steps=3)
        assert set(fast) == set(expected) and all(torch.allclose(fast[n], expected[n], atol=1e-12) for n in expected)
    for (loss, grads), batch in zip(meta.batched_meta_gradients(batches, steps=3, second_order=True), batches):
        expected_loss, expected = meta.meta_gradients(batch, steps=3, second_order=True)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
        assert set(grads) == set(expected) and all(torch.allclose(grads[n], expected[n], atol=1e-12) for n in expected)


def test_a_model_with_tied_weights_is_refused(setting):
    """The core swaps parameters in by name without looking for tied ones (maml._call): a parameter shared
    under two names would keep its old value under the other name, so such a model is refused up front."""
    model, inner, _, lrs = setting
    model.c = model.b  # the same parameters under a second name
    with pytest.raises(ValueError, match="tied"):
        adapt(model, ce, inner, lrs=lrs, steps=1)
    with pytest.raises(ValueError, match="tied"):
        MetaModel(model, 2, 0.1)
