"""KL_k1, KL_k2, KL_k3 (docs/algorithm.md §6; Schulman, "Approximating KL Divergence")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stagerl.algo import KL_ESTIMATORS, kl_divergence
from stagerl.errors import UserError


def test_hand_example_all_estimators():
    # ℓ = log 0.5, ℓ^ref = log 0.25 -> log r = ℓ^ref − ℓ = log 0.5 = −0.693147, r = 0.5.
    #   k1 = −log r = 0.693147
    #   k2 = ½ (log r)² = 0.240227
    #   k3 = (r − 1) − log r = −0.5 + 0.693147 = 0.193147
    logp = torch.full((1, 1), math.log(0.5))
    ref = torch.full((1, 1), math.log(0.25))
    assert kl_divergence(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_divergence(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_divergence(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)


def test_k3_other_direction():
    # ℓ = log 0.25, ℓ^ref = log 0.5 -> log r = log 2, r = 2: k3 = 1 − 0.693147 = 0.306853.
    logp = torch.tensor([[math.log(0.25)]])
    ref = torch.tensor([[math.log(0.5)]])
    assert kl_divergence(logp, ref).item() == pytest.approx(0.306853, abs=1e-6)


def test_registry_and_bad_name():
    assert set(KL_ESTIMATORS) >= {"k1", "k2", "k3"}
    with pytest.raises(UserError, match="k3"):
        kl_divergence(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_gradient_flows_through_policy_only():
    logp = torch.randn(2, 3, requires_grad=True)
    ref = torch.randn(2, 3, requires_grad=True)
    kl_divergence(logp, ref).sum().backward()
    assert logp.grad is not None and ref.grad is None
    # d k3 / dℓ = 1 − exp(ℓ^ref − ℓ)
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref.detach() - logp.detach()))


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=30),
       estimator=st.sampled_from(["k2", "k3"]))
def test_kl_nonnegative(values, estimator):
    logp = torch.tensor([[a for a, _ in values]])
    ref = torch.tensor([[b for _, b in values]])
    assert (kl_divergence(logp, ref, estimator) >= 0).all()


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-50, 0), min_size=1, max_size=30),
       estimator=st.sampled_from(["k1", "k2", "k3"]))
def test_kl_exactly_zero_when_equal(values, estimator):
    logp = torch.tensor([values])
    assert (kl_divergence(logp, logp.clone(), estimator) == 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_estimators_agree_with_formulas_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 7, generator=gen, dtype=torch.float64) * 5
    ref = -torch.rand(4, 7, generator=gen, dtype=torch.float64) * 5
    log_r = (ref - logp).float()
    torch.testing.assert_close(kl_divergence(logp, ref, "k1"), -log_r)
    torch.testing.assert_close(kl_divergence(logp, ref, "k2"), 0.5 * log_r ** 2)
    torch.testing.assert_close(kl_divergence(logp, ref, "k3"), torch.exp(log_r) - log_r - 1)
