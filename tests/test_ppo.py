"""ppo.py: the clipped surrogate, value clipping, KL estimators, token rewards, whitening and the
adaptive KL controller checked as properties; then the script end to end. Each test's name or
docstring states the invariant it checks."""

import json
import math
import shutil
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.testing import assert_close
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import ppo
from gae import gae
from tiny import CHECKPOINT, TabularPolicy, all_responses, prefixes, response_batch, run_script, tiny_model

RESPONSES = all_responses()
finite = st.floats(-5, 5)
clip_ranges = st.floats(0.05, 0.5)


def tensors(n: int, elements=finite):
    return st.lists(elements, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))


@st.composite
def padded(draw, fill=math.nan):
    """(x, mask) [B, T] float64 with right-padded rows of 1..T valid tokens, padding set to `fill`."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    mask = torch.arange(T) < lengths[:, None]
    return torch.where(mask, draw(tensors(B * T)).view(B, T), fill), mask


@st.composite
def ratios_and_advantages(draw, n=8):
    """Per-token r_t and A_t: r spans [0.1, 3], A is never 0."""
    log_r = draw(tensors(n, st.floats(math.log(0.1), math.log(3))))
    advantages = draw(tensors(n, st.one_of(st.floats(-5, -1e-3), st.floats(1e-3, 5))))
    return log_r, advantages


def surrogate_gradient(log_r: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """∂(per-token PPO loss)/∂ log π_θ at log π_θ = log π_old + log r, with log π_old = 0."""
    logp = log_r.clone().requires_grad_(True)
    loss, _ = ppo.policy_loss(logp, torch.zeros_like(logp), advantages, clip_range)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return grad


# ---- The clipped surrogate ----
@given(ratios_and_advantages(), clip_ranges)
def test_clipped_gradient_is_zero_where_the_clip_binds_and_unclipped_elsewhere(batch, eps):
    """∇ is exactly 0 where A > 0 and r > 1 + ε or A < 0 and r < 1 − ε; everywhere else it equals the
    gradient of the unclipped −r·A, which is −r·A per unit of log π (boundaries avoided)."""
    log_r, advantages = batch
    r = log_r.exp()
    assume(((r - (1 + eps)).abs() > 1e-6).all() and ((r - (1 - eps)).abs() > 1e-6).all())
    binds = ((advantages > 0) & (r > 1 + eps)) | ((advantages < 0) & (r < 1 - eps))
    grad = surrogate_gradient(log_r, advantages, eps)
    assert (grad[binds] == 0).all()
    assert_close(grad[~binds], (-r * advantages)[~binds], rtol=1e-12, atol=0)


@given(ratios_and_advantages(), clip_ranges)
def test_clipped_objective_never_exceeds_the_unclipped_one(batch, eps):
    """min(r·A, clip(r)·A) ≤ r·A: the clipped objective is a pessimistic bound."""
    log_r, advantages = batch
    loss, ratio = ppo.policy_loss(log_r, torch.zeros_like(log_r), advantages, eps)
    assert (-loss <= ratio * advantages).all()


@given(st.lists(finite, min_size=len(prefixes()) * 3, max_size=len(prefixes()) * 3), tensors(len(RESPONSES) * 3),
       st.floats(0.5, 2), clip_ranges)
def test_at_ratio_one_the_ppo_gradient_is_the_vanilla_policy_gradient(theta, advantages, temperature, eps):
    """With π_θ = π_old (the first minibatch), ∇ of the PPO loss = ∇ of −A·log π_θ, token by token
    through the script's forward pass on an enumerable policy."""
    policy = TabularPolicy(torch.tensor(theta, dtype=torch.float64).view(-1, 3))
    ids, attn, n_prompt, mask = response_batch(RESPONSES)
    advantages = advantages.view(len(RESPONSES), 3)
    logp, _, _ = ppo.forward(policy, ids, attn, n_prompt, temperature)
    ppo_loss, ratio = ppo.policy_loss(logp, logp.detach(), advantages, eps)
    (ppo_grad,) = torch.autograd.grad(ppo.masked_mean(ppo_loss, mask), policy.theta)
    (vanilla,) = torch.autograd.grad(ppo.masked_mean(-advantages * logp, mask), policy.theta)
    assert (ratio == 1).all()
    assert_close(ppo_grad, vanilla, rtol=1e-12, atol=1e-12)


# ---- Value clipping ----
def value_loss_by_cases(v: float, v_old: float, R: float, eps: float) -> tuple[float, float]:
    """(loss, ∂loss/∂V) by hand. Inside the band |V − V_old| ≤ ε_v it is plain regression. Outside,
    the band's edge e on V's side counts instead of V when e is farther from R: moving V past the
    band toward R earns nothing (gradient 0); moving it away from R is charged in full."""
    if abs(v - v_old) <= eps:
        return 0.5 * (v - R) ** 2, v - R
    edge = v_old + eps if v > v_old else v_old - eps
    if abs(edge - R) > abs(v - R):
        return 0.5 * (edge - R) ** 2, 0.0
    return 0.5 * (v - R) ** 2, v - R


@given(tensors(4), tensors(4), tensors(4), st.floats(0.01, 1))
def test_value_loss_matches_its_case_analysis_and_is_never_below_the_unclipped_error(v, v_old, R, eps):
    values = v.clone().requires_grad_(True)
    loss = ppo.value_loss(values, v_old, R, eps)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    for i in range(len(v)):
        # Stay clear of the ties where the case analysis switches and the gradient jumps.
        edge = v_old[i] + eps * torch.sign(v[i] - v_old[i])
        assume(abs(abs(v[i] - v_old[i]) - eps) > 1e-6 and abs(abs(edge - R[i]) - abs(v[i] - R[i])) > 1e-6)
        expected_loss, expected_grad = value_loss_by_cases(v[i].item(), v_old[i].item(), R[i].item(), eps)
        assert loss[i].item() == pytest.approx(expected_loss, rel=1e-12, abs=1e-12)
        assert grad[i].item() == pytest.approx(expected_grad, rel=1e-12, abs=1e-12)
    assert (loss >= 0.5 * (v - R) ** 2).all()


# ---- KL estimators ----
@given(st.integers(2, 6).flatmap(lambda k: st.tuples(tensors(k), tensors(k))))
def test_k1_and_k3_are_unbiased_estimators_of_kl(logits):
    """Σ_x π(x)·k(x) = KL(π‖π_ref) = Σ_x π(x)·(log π(x) − log π_ref(x)) exactly, over a small categorical."""
    logp, logp_ref = (x.log_softmax(0) for x in logits)
    kl = (logp.exp() * (logp - logp_ref)).sum()
    for k in ppo.kl_estimators(logp, logp_ref):
        assert_close((logp.exp() * k).sum(), kl, rtol=1e-9, atol=1e-12)


@given(tensors(16, st.floats(-30, 30)), tensors(16, st.floats(-30, 30)))
def test_k3_is_never_negative(logp, logp_ref):
    _, k3 = ppo.kl_estimators(logp, logp_ref)
    assert (k3 >= 0).all()


# ---- Token rewards and advantages ----
@given(padded(), st.data(), st.floats(0, 2))
def test_monte_carlo_advantage_is_score_minus_beta_times_kl_to_go(batch, data, beta):
    """γ = λ = 1, V = 0: A_t = score − β·Σ_{t' ≥ t} kl_{t'}, kl = log π_old − log π_ref; the reward at
    the last valid token (EOS) is score − β·kl there, and 0 on padding. Padding holds NaN."""
    logp_old, mask = batch
    logp_ref = torch.where(mask, data.draw(tensors(mask.numel())).view(mask.shape), math.nan)
    scores = data.draw(tensors(len(mask)))
    rewards = ppo.token_rewards(scores, logp_old, logp_ref, mask, beta)
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    for i, n in enumerate(mask.sum(1).tolist()):
        kl = logp_old[i, :n] - logp_ref[i, :n]
        kl_to_go = kl.flip(0).cumsum(0).flip(0)
        assert_close(advantages[i, :n], scores[i] - beta * kl_to_go)
        assert_close(rewards[i, n - 1], scores[i] - beta * kl[-1])
        assert (rewards[i, n:] == 0).all()


# ---- Masked statistics and whitening ----
@given(padded())
def test_masked_statistics_and_whitening_ignore_nan_padding(batch):
    """Mean and variance are those of the valid entries alone; whitening gives 0 on padding, mean 0
    and (for a spread-out batch) variance 1 over the mask, and keeps the order of the valid entries."""
    x, mask = batch
    valid = x[mask]
    assert_close(ppo.masked_mean(x, mask), valid.mean())
    assert_close(ppo.masked_var(x, mask), valid.var(unbiased=False))
    w = ppo.whiten(x, mask)
    assert (w[~mask] == 0).all() and w.isfinite().all()
    assert abs(w[mask].mean().item()) < 1e-9
    if valid.var(unbiased=False) > 1e-3:
        assert_close(w[mask].var(unbiased=False), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    order = valid.argsort()
    assert (w[mask][order].diff() >= 0).all()


# ---- Adaptive KL controller ----
@given(st.floats(1e-3, 10), st.floats(0, 50), st.floats(0.1, 20), st.integers(1, 512), st.floats(1, 5))
def test_adaptive_beta_moves_toward_the_target_by_at_most_its_clip(beta, kl, target, n, horizon_over_clip):
    """KL above the target raises β and KL below lowers it, by |Δβ| ≤ 0.2·β·n/horizon; β stays > 0."""
    assume(abs(kl - target) > 1e-6 * target)
    horizon = math.ceil(0.2 * n * horizon_over_clip) + 1
    new = ppo.adaptive_kl_coef(beta, kl, target, n, horizon)
    assert (new > beta) == (kl > target) and new > 0
    assert abs(new - beta) <= 0.2 * beta * n / horizon * (1 + 1e-12)
