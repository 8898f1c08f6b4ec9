"""grpo.py: GRPO's three contested choices (advantages, KL penalty, loss aggregation) and the four of 2025–26
(clip-higher, dynamic sampling, GSPO's sequence ratio, CISPO) proved by exact enumeration, never by sampling, on
the functions the script trains with: every response of an enumerable tabular policy, every N-tuple of a
minibatch, every G-tuple of a group, in float64. Each test's name states the fact and its docstring the
equation. Then the script: the ratio before the first step, micro-batching, β = 0 without π_ref, the KL's sign,
dynamic sampling's batch, and end to end. KL divergences are named by their formula: KL(π_θ‖π_ref) is
pi_theta_pi_ref in a name (the reverse KL of RLHF's convention), KL(π_ref‖π_θ) pi_ref_pi_theta (the forward).

Notation: π = π_θ, y = (a_0, …, a_{|y|−1}) a response, s_t = a_<t the state token a_t is chosen in, d(s) the
probability that π reaches state s, J = E_{y~π}[R(y)], ∇ = ∇_θ. "Expected gradient" is E_y[∇ loss(y)]: the
sampling distribution is held fixed, as it is when a sampled batch is differentiated."""

import copy
import dataclasses
import functools
import itertools
import json
import math
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import grpo
from tiny import (
    CHECKPOINT,
    EOS,
    MAX_LEN,
    ROOT,
    all_responses,
    assert_one_error_line_before_any_work,
    exit_message,
    prefixes,
    response_batch,
    run_main,
    run_script,
    tiny_model,
    without_seconds,
)

RESPONSES = all_responses()  # 15 responses of 1, 2 or 3 tokens; 8 of them cut off at MAX_LEN
LENGTHS = torch.tensor([len(y) for y in RESPONSES], dtype=torch.float64)
N_STATES = len(prefixes())
MODES = ("sequence", "token", "constant")


def logits_table(rows: int, cols: int, low: float = -3, high: float = 3):
    return st.lists(st.floats(low, high), min_size=rows * cols, max_size=rows * cols).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).view(rows, cols)
    )


def reals(n: int, low: float = -5, high: float = 5):
    return st.lists(st.floats(low, high), min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension. (torch's own log_softmax can take milliseconds on a tiny tensor
    when it starts its thread pool; logsumexp does not.)"""
    return x - x.logsumexp(-1, keepdim=True)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()


def seeded_table(seed: int, rows: int = N_STATES, cols: int = 3) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- The tabular policy, token by token ----
@functools.cache
def token_index(responses: tuple, max_len: int):
    """The response mask [B, T] of the sampler's format (tiny.response_batch), and the state s_t and action a_t
    of every token (0 on padding): what indexes θ's log-softmax table."""
    _, _, _, mask = response_batch(list(responses))
    index = {p: i for i, p in enumerate(prefixes(max_len))}
    T = mask.shape[1]
    states = torch.tensor([[index[y[:t]] if t < len(y) else 0 for t in range(T)] for y in responses])
    actions = torch.tensor([[y[t] if t < len(y) else 0 for t in range(T)] for y in responses])
    return mask, states, actions


def token_logprobs(theta: torch.Tensor, responses=RESPONSES, max_len: int = MAX_LEN):
    """log π(a_t | s_t) [B, T] for `responses` under π(· | s) = softmax(θ[s]), NaN on padding, and the mask."""
    mask, states, actions = token_index(tuple(responses), max_len)
    return torch.where(mask, log_softmax(theta)[states, actions], math.nan), mask


def sequence_logprobs(theta: torch.Tensor, responses=RESPONSES, max_len: int = MAX_LEN) -> torch.Tensor:
    """log π(y) = Σ_t log π(a_t | s_t)."""
    logp, mask = token_logprobs(theta, responses, max_len)
    return torch.where(mask, logp, 0.0).sum(1)


def state_probs(theta: torch.Tensor, max_len: int = MAX_LEN) -> torch.Tensor:
    """d(s) = Π_k π(s_k | s_<k) for every state s: the probability that a response passes through s."""
    return sequence_logprobs(theta, prefixes(max_len), max_len).exp()


def grad(f, theta: torch.Tensor) -> torch.Tensor:
    """∇_θ f(θ) by autograd."""
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t), t)
    return g


def expected_reward_gradient(theta, rewards, responses=RESPONSES, max_len=MAX_LEN):
    """∇J, J = Σ_y π(y)·R(y), by autograd of the exact J (no score function)."""
    return grad(lambda t: (sequence_logprobs(t, responses, max_len).exp() * rewards).sum(), theta)


def sequence_kl_gradient(theta, theta_ref, ref_first: bool = False, max_len: int = MAX_LEN):
    """∇ KL(π(y)‖π_ref(y)) = ∇ Σ_y π(y)·log(π(y)/π_ref(y)), or ∇ KL(π_ref(y)‖π(y)), of the exact sequence KL."""
    responses = all_responses(max_len)
    logp_ref = sequence_logprobs(theta_ref, responses, max_len)

    def kl(t):
        logp = sequence_logprobs(t, responses, max_len)
        return (logp_ref.exp() * (logp_ref - logp)).sum() if ref_first else (logp.exp() * (logp - logp_ref)).sum()

    return grad(kl, theta)


def per_state_kl_gradient(theta, theta_ref, ref_first: bool = False, max_len: int = MAX_LEN, d=None):
    """Σ_s d(s)·∇ KL(π(·|s)‖π_ref(·|s)) (or of KL(π_ref(·|s)‖π(·|s))) with d held fixed: each state's KL is
    differentiated, the probability of reaching the state is not. d defaults to π's state distribution."""
    d = state_probs(theta, max_len) if d is None else d
    logp_ref = log_softmax(theta_ref)

    def kl(t):
        logp = log_softmax(t)
        per_state = logp_ref.exp() * (logp_ref - logp) if ref_first else logp.exp() * (logp - logp_ref)
        return (d * per_state.sum(-1)).sum()

    return grad(kl, theta)


def expected_penalty_gradient(theta, theta_ref, estimator: str, max_len: int = MAX_LEN):
    """E_{y~π}[∇ Σ_t k(a_t | s_t)]: every response, weighted by its (detached) probability, its per-token
    estimates summed over its valid tokens and differentiated through log π_θ only."""
    responses = all_responses(max_len)
    weights = sequence_logprobs(theta, responses, max_len).exp()
    logp_ref, _ = token_logprobs(theta_ref, responses, max_len)

    def loss(t):
        logp, mask = token_logprobs(t, responses, max_len)
        k = grpo.kl_penalty(logp, logp_ref, estimator)
        return (weights * torch.where(mask, k, 0.0).sum(1)).sum()

    return grad(loss, theta)


# ---- KL penalty: one token, a categorical policy ----
def categorical_expected_gradient(theta, theta_ref, estimator):
    """E_{y~π}[∇ k(y)] = Σ_y π(y)·∇ k(y) for π = softmax(θ) over len(θ) one-token responses."""
    pi = log_softmax(theta).exp()
    return grad(lambda t: (pi * grpo.kl_penalty(log_softmax(t), log_softmax(theta_ref), estimator)).sum(), theta)


def categorical_kl(logp, logq):
    """KL(p‖q) = Σ_y p(y)·(log p(y) − log q(y))."""
    return (logp.exp() * (logp - logq)).sum()


categoricals = st.integers(2, 6).flatmap(lambda k: st.tuples(reals(k, -4, 4), reals(k, -4, 4)))


@given(categoricals)
def test_one_token_k1_in_the_loss_has_expected_gradient_zero(logits):
    """E_π[∇ k1] = Σ_y π(y)·∇ log π(y) = ∇ Σ_y π(y) = 0: k1 in the loss pulls nowhere on average."""
    theta, theta_ref = logits
    assert_close(categorical_expected_gradient(theta, theta_ref, "k1"), torch.zeros_like(theta), rtol=0, atol=1e-12)


@given(categoricals)
def test_one_token_k2_in_the_loss_has_the_gradient_of_kl_pi_theta_pi_ref(logits):
    """E_π[∇ ½(log π − log π_ref)²] = Σ_y ∇π(y)·log(π/π_ref)(y) = ∇ KL(π‖π_ref), as Σ_y π·∇log π = 0."""
    theta, theta_ref = logits
    expected = grad(lambda t: categorical_kl(log_softmax(t), log_softmax(theta_ref)), theta)
    assert_close(categorical_expected_gradient(theta, theta_ref, "k2"), expected, rtol=1e-9, atol=1e-12)


@given(categoricals)
def test_one_token_k3_in_the_loss_has_the_gradient_of_kl_pi_ref_pi_theta(logits):
    """∇ k3 = ∇(ρ − 1 − log ρ) = (1 − ρ)·∇log π with ρ = π_ref/π, so E_π[∇ k3] = −Σ_y π_ref(y)·∇log π(y)
    = ∇ KL(π_ref‖π): GRPO's k3 in the loss follows KL(π_ref‖π), the forward (mass-covering) KL, not the
    KL(π‖π_ref) it estimates, the reverse (mode-seeking) KL of RLHF's objective."""
    theta, theta_ref = logits
    expected = grad(lambda t: categorical_kl(log_softmax(theta_ref), log_softmax(t)), theta)
    assert_close(categorical_expected_gradient(theta, theta_ref, "k3"), expected, rtol=1e-9, atol=1e-12)


@given(categoricals, st.floats(0.01, 2))
def test_one_token_minus_beta_k1_in_the_reward_ascends_minus_beta_times_kl_pi_theta_pi_ref(logits, beta):
    """With r = −β·k1 detached, the score-function step E_π[r(y)·∇log π(y)] = −β·Σ_y ∇π·log(π/π_ref)
    = −β·∇ KL(π‖π_ref)."""
    theta, theta_ref = logits
    reward = -beta * grpo.kl_penalty(log_softmax(theta), log_softmax(theta_ref), "k1")
    step = grad(lambda t: (log_softmax(theta).exp() * reward * log_softmax(t)).sum(), theta)
    expected = grad(lambda t: categorical_kl(log_softmax(t), log_softmax(theta_ref)), theta)
    assert_close(step, -beta * expected, rtol=1e-9, atol=1e-12)


# ---- KL penalty: responses of several tokens ----
tables = logits_table(N_STATES, 3)


@given(tables, tables)
def test_summed_k1_in_the_loss_has_expected_gradient_zero_over_whole_responses(theta, theta_ref):
    """E_y[∇ Σ_t k1(a_t|s_t)] = E_y[∇ log π(y)] = 0, over every response, cut-off ones included."""
    assert_close(expected_penalty_gradient(theta, theta_ref, "k1"), torch.zeros_like(theta), rtol=0, atol=1e-12)


@given(tables, tables)
def test_summed_k2_in_the_loss_is_the_per_state_kl_pi_theta_pi_ref_gradient_with_states_held_fixed(theta, theta_ref):
    """E_y[∇ Σ_t k2(a_t|s_t)] = Σ_t E_{s_t~π}[∇ KL(π(·|s_t)‖π_ref(·|s_t))] = Σ_s d(s)·∇ KL_s with d fixed:
    each state's categorical fact, weighted by how often π reaches the state."""
    expected = per_state_kl_gradient(theta, theta_ref)
    assert_close(expected_penalty_gradient(theta, theta_ref, "k2"), expected, rtol=1e-9, atol=1e-12)


@given(logits_table(1, 3), logits_table(1, 3))
def test_summed_k2_is_the_sequence_kl_gradient_when_responses_have_one_token(theta, theta_ref):
    """max_len = 1 (one state, d = 1): E_y[∇ k2] = ∇ KL(π(y)‖π_ref(y)) exactly."""
    expected = sequence_kl_gradient(theta, theta_ref, max_len=1)
    assert_close(expected_penalty_gradient(theta, theta_ref, "k2", max_len=1), expected, rtol=1e-9, atol=1e-12)


def test_summed_k2_is_not_the_sequence_kl_gradient_on_longer_responses():
    """By the chain rule KL(π(y)‖π_ref(y)) = Σ_s d(s)·KL_s, so its gradient is Σ_s d·∇KL_s + Σ_s ∇d·KL_s;
    summed k2 misses the second term (it does not steer away from states where the KL is large)."""
    theta, theta_ref = seeded_table(0), seeded_table(1)
    k2 = expected_penalty_gradient(theta, theta_ref, "k2")
    sequence = sequence_kl_gradient(theta, theta_ref)
    kl_s = (log_softmax(theta).exp() * (log_softmax(theta) - log_softmax(theta_ref))).sum(-1)
    missing = grad(lambda t: (state_probs(t) * kl_s).sum(), theta)
    assert (k2 - sequence).abs().max() > 0.05
    assert_close(k2 + missing, sequence, rtol=1e-9, atol=1e-12)


@given(tables, tables)
def test_summed_k3_in_the_loss_is_the_per_state_kl_pi_ref_pi_theta_gradient_with_states_held_fixed(theta, theta_ref):
    """E_y[∇ Σ_t k3(a_t|s_t)] = Σ_s d_π(s)·∇ KL(π_ref(·|s)‖π(·|s)) with d_π fixed."""
    expected = per_state_kl_gradient(theta, theta_ref, ref_first=True)
    assert_close(expected_penalty_gradient(theta, theta_ref, "k3"), expected, rtol=1e-9, atol=1e-12)


def test_summed_k3_is_neither_sequence_kl_gradient_on_longer_responses():
    """∇ KL(π_ref(y)‖π(y)) = −Σ_y π_ref(y)·∇log π(y) = Σ_s d_ref(s)·∇ KL(π_ref(·|s)‖π(·|s)) weighs the states by
    π_ref's state distribution d_ref, summed k3 by π's: they differ by Σ_s (d_π − d_ref)(s)·∇ KL(π_ref(·|s)‖π(·|s)).
    The sequence KL(π(y)‖π_ref(y)) is another divergence again: on a seeded θ summed k3 is more than 0.05 from
    both."""
    theta, theta_ref = seeded_table(0), seeded_table(1)
    k3 = expected_penalty_gradient(theta, theta_ref, "k3")
    ref_pi = sequence_kl_gradient(theta, theta_ref, ref_first=True)  # ∇ KL(π_ref(y)‖π(y))
    d_ref = state_probs(theta_ref)
    assert_close(per_state_kl_gradient(theta, theta_ref, ref_first=True, d=d_ref), ref_pi, rtol=1e-9, atol=1e-12)
    difference = per_state_kl_gradient(theta, theta_ref, ref_first=True, d=state_probs(theta) - d_ref)
    assert_close(k3 - ref_pi, difference, rtol=1e-9, atol=1e-12)
    assert (k3 - ref_pi).abs().max() > 0.05 and (k3 - sequence_kl_gradient(theta, theta_ref)).abs().max() > 0.05


@given(tables, tables, st.floats(0.01, 2))
def test_minus_beta_k1_in_the_reward_in_total_or_to_go_ascends_minus_beta_times_the_sequence_kl(theta, theta_ref, beta):
    """r_t = −β·k1(a_t|s_t) detached, each token's ∇log π(a_t|s_t) scaled by the response's total Σ_t' r_t'
    or by its reward-to-go Σ_{t'≥t} r_t': E_y[…] = −β·∇ KL(π(y)‖π_ref(y)) exactly, since
    Σ_t k1 = log(π(y)/π_ref(y)) and the terms t' < t vanish in expectation (E_{a_t}[∇log π(a_t|s_t)] = 0)."""
    weights = sequence_logprobs(theta).exp()
    logp_ref, _ = token_logprobs(theta_ref)
    logp_old, mask = token_logprobs(theta)
    r = torch.where(mask, -beta * grpo.kl_penalty(logp_old, logp_ref, "k1"), 0.0)
    total = r.sum(1, keepdim=True).expand_as(r)
    to_go = r.flip(1).cumsum(1).flip(1)
    expected = -beta * sequence_kl_gradient(theta, theta_ref)
    for scale in (total, to_go):

        def surrogate(t, scale=scale):
            logp, _ = token_logprobs(t)
            return (weights * torch.where(mask, scale * logp, 0.0).sum(1)).sum()

        assert_close(grad(surrogate, theta), expected, rtol=1e-9, atol=1e-12)


def test_k3_and_its_gradient_stay_finite_in_float32_however_far_pi_theta_falls_below_pi_ref():
    """k3 = e^{log ρ} − 1 − log ρ, ρ = π_ref/π_θ, overflows float32 once log ρ > 88. kl_penalty takes log ρ at most 20
    (veRL's bound): k3 and ∂k3/∂log π_θ = 1 − ρ are exact (to float32 rounding) up to 20, and past it e^20 − 21
    and 0, finite for any log π_θ − log π_ref. (veRL's further clamp of k3 at 10 nats would change k3 from
    log ρ ≈ 2.6 on, where the enumerations above hold it exact.)"""
    log_rho = torch.tensor([-1e4, -30, -1, 0, 1, 2.7, 10, 19.9, 20, 20.5, 89, 1e4], dtype=torch.float32)
    logp = (-log_rho).requires_grad_(True)  # log π_θ, with log π_ref = 0
    k3 = grpo.kl_penalty(logp, torch.zeros_like(logp), "k3")
    (gradient,) = torch.autograd.grad(k3.sum(), logp)
    assert k3.isfinite().all() and gradient.isfinite().all()
    x = log_rho.double().clamp(max=20)
    assert_close(k3.double(), torch.expm1(x) - x, rtol=1e-6, atol=1e-6)
    assert_close(gradient.double(), torch.where(log_rho <= 20, -torch.expm1(x), 0.0), rtol=1e-6, atol=1e-6)


# ---- Loss aggregation ----
def expected_minibatch_gradient(theta, rewards, mode: str, n: int, max_new_tokens: int = MAX_LEN, responses=RESPONSES):
    """Exact E[∇L] over every N-tuple (y_1, …, y_N) of i.i.d. responses y_i ~ π, for the minibatch loss
    L = Σ_i Σ_t w_{i,t}·ℓ_{i,t}, ℓ_{i,t} = −R(y_i)·log π(a_t|s_t), with the weights token_weights gives each tuple.
    By linearity E[∇L] = ∇ Σ_y Σ_t W_{y,t}·ℓ_{y,t} with W_{y,t} = Σ_tuples P(tuple)·Σ_{i: y_i = y} w_{i,t}."""
    mask = token_index(tuple(responses), MAX_LEN)[0]
    p = sequence_logprobs(theta, responses).exp()
    W = torch.zeros(mask.shape, dtype=torch.float64)
    for rows in itertools.product(range(len(responses)), repeat=n):
        rows = torch.tensor(rows)
        m = mask[rows]
        w = grpo.token_weights(m, mode, n, int(m.sum()), max_new_tokens, dtype=torch.float64)
        W.index_add_(0, rows, p[rows].prod() * w)
    return grad(lambda t: grpo.weighted_loss(-rewards[:, None] * token_logprobs(t, responses)[0], W, mask), theta)


def reward_per_token_gradient(theta, rewards):
    """∇ E_y[R(y)/|y|], by autograd of the exact expectation."""
    return expected_reward_gradient(theta, rewards / LENGTHS)


CORRECT = torch.tensor([float(y in {(2, EOS), (1, 2, EOS), (2, 2, 1)}) for y in RESPONSES], dtype=torch.float64)


@settings(max_examples=20)
@given(tables, reals(len(RESPONSES)), st.integers(1, 2), st.integers(MAX_LEN, 8))
def test_constant_weights_give_minus_grad_j_over_max_new_tokens_for_any_batch_size(theta, rewards, n, max_new):
    """Dr. GRPO: w = 1/(N·max_new_tokens), so E[∇L] = −(1/max_new_tokens)·E_y[R(y)·∇log π(y)] = −∇J/max_new_tokens
    for every N: the policy gradient, rescaled by a constant."""
    expected = -expected_reward_gradient(theta, rewards) / max_new
    assert_close(expected_minibatch_gradient(theta, rewards, "constant", n, max_new), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=20)
@given(tables, reals(len(RESPONSES)), st.integers(1, 2))
def test_sequence_weights_give_minus_the_gradient_of_the_expected_reward_per_token(theta, rewards, n):
    """GRPO paper: w = 1/(N·|y_i|), so E[∇L] = −E_y[R(y)/|y|·∇log π(y)] = −∇ E_y[R(y)/|y|] for every N: the
    policy gradient of another objective, the reward divided by the response's length."""
    expected = -reward_per_token_gradient(theta, rewards)
    assert_close(expected_minibatch_gradient(theta, rewards, "sequence", n), expected, rtol=1e-9, atol=1e-12)


def test_sequence_weights_are_not_along_the_policy_gradient_when_lengths_differ():
    """−∇E[R/|y|] and −∇J point in different directions: cos < 0.999 on a seeded θ, rewarding three answers of
    lengths 2, 3 and 3 (one of them cut off)."""
    theta = seeded_table(0)
    step = -expected_minibatch_gradient(theta, CORRECT, "sequence", 1)
    assert 0 < cosine(step, expected_reward_gradient(theta, CORRECT)) < 0.999


PAIRS = [(short, long) for short in RESPONSES for long in RESPONSES if len(short) < len(long)]


@given(tables, st.sampled_from(PAIRS), st.sampled_from([1, -1]))
def test_sequence_weights_favour_short_right_answers_and_long_wrong_ones(theta, pair, sign):
    """Reward R = ±1 on a short response y_s and a long one y_l, 0 elsewhere. Scale the expected sequence-mode
    step g = −E[∇L] to ĝ = g·(∇J·∇J)/(g·∇J), so that it raises J exactly as fast as ∇J does. Then, with
    a = ∇π(y_s), b = ∇π(y_l), ∇J = ±(a + b) and g ∝ ±(a + λb), λ = |y_s|/|y_l| < 1:
        R = +1:  a·ĝ > a·∇J and b·ĝ < b·∇J   (the short right answer rises faster, the long one slower);
        R = −1:  b·ĝ > b·∇J and a·ĝ < a·∇J   (the long wrong answer falls slower, the short one faster).
    Exactly: ĝ − ∇J ⟂ a + b, and a·(ĝ − ∇J) = −b·(ĝ − ∇J) = ±(1 − λ)·(|a|²|b|² − (a·b)²)/((a + λb)·(a + b)),
    of R's sign by Cauchy–Schwarz unless a ∥ b (the denominator is |y_s|·g·∇J > 0)."""
    short, long = (RESPONSES.index(y) for y in pair)
    rewards = torch.zeros(len(RESPONSES), dtype=torch.float64)
    rewards[[short, long]] = float(sign)
    grad_j = expected_reward_gradient(theta, rewards).flatten()
    g = -expected_minibatch_gradient(theta, rewards, "sequence", 1).flatten()
    a = grad(lambda t: sequence_logprobs(t)[short].exp(), theta).flatten()
    b = grad(lambda t: sequence_logprobs(t)[long].exp(), theta).flatten()
    assume((a @ a) * (b @ b) - (a @ b) ** 2 > 1e-6 * (a @ a) * (b @ b))  # not parallel
    assert g @ grad_j > 0
    g_hat = g * (grad_j @ grad_j) / (g @ grad_j)
    assert_close(g_hat @ grad_j, grad_j @ grad_j)
    lam = len(pair[0]) / len(pair[1])
    gap = sign * (1 - lam) * ((a @ a) * (b @ b) - (a @ b) ** 2) / ((a + lam * b) @ (a + b))
    assert_close(a @ (g_hat - grad_j), gap)
    assert_close(b @ (g_hat - grad_j), -gap)
    favoured, disfavoured = (a, b) if sign == 1 else (b, a)
    assert favoured @ g_hat > favoured @ grad_j and disfavoured @ g_hat < disfavoured @ grad_j


def test_token_weights_are_not_along_the_policy_gradient_for_a_finite_minibatch():
    """DAPO/TRL: w = 1/Σ_i |y_i|, so E[∇L] = −E[Σ_i R(y_i)·∇log π(y_i) / Σ_i |y_i|] over N i.i.d. responses:
    for N = 1 it is the sequence mode's −E[R/|y|·∇log π(y)], and for N = 2, 3 still not along ∇J
    (1 − cos > 1e-4 on a seeded θ: 1.2e-3 for N = 2, 5.9e-4 for N = 3), because a response's weight
    depends on the lengths drawn beside it."""
    theta = seeded_table(0)
    grad_j = expected_reward_gradient(theta, CORRECT)
    token = {n: expected_minibatch_gradient(theta, CORRECT, "token", n) for n in (1, 2, 3)}
    assert_close(token[1], expected_minibatch_gradient(theta, CORRECT, "sequence", 1), rtol=1e-12, atol=1e-15)
    assert all(0 < cosine(-token[n], grad_j) < 1 - 1e-4 for n in (2, 3))


def test_token_weights_approach_the_policy_gradient_as_the_minibatch_grows():
    """Consistency: Σ_i R_i ∇log π(y_i)/N → ∇J and Σ_i |y_i|/N → E|y| as N → ∞, so E[∇L] → −∇J/E|y|. On three
    seeded θ, exactly for N = 1, 2, 3: the cosine with ∇J rises and the distance to −∇J/E|y| falls."""
    for seed in range(3):
        theta = seeded_table(seed)
        grad_j = expected_reward_gradient(theta, CORRECT)
        limit = -grad_j / (sequence_logprobs(theta).exp() * LENGTHS).sum()
        token = [expected_minibatch_gradient(theta, CORRECT, "token", n) for n in (1, 2, 3)]
        cosines = [cosine(-g, grad_j) for g in token]
        distances = [(g - limit).norm().item() for g in token]
        assert cosines[0] < cosines[1] < cosines[2] < 1 and distances[0] > distances[1] > distances[2] > 0


@settings(max_examples=10)
@given(logits_table(N_STATES, 2), reals(2**MAX_LEN), st.integers(1, 3))
def test_token_weights_give_minus_grad_j_over_the_length_when_every_response_has_the_same_length(theta, rewards, n):
    """EOS never sampled (its logit −∞): every response is cut off at MAX_LEN tokens, Σ_i |y_i| = N·MAX_LEN,
    and E[∇L] = −∇J/MAX_LEN exactly, for N = 1, 2, 3."""
    theta = torch.cat([torch.full((N_STATES, 1), -math.inf, dtype=torch.float64), theta], 1)
    cut_off = [y for y in RESPONSES if EOS not in y]
    expected = -expected_reward_gradient(theta, rewards, cut_off) / MAX_LEN
    step = expected_minibatch_gradient(theta, rewards, "token", n, responses=cut_off)
    assert_close(step, expected, rtol=1e-9, atol=1e-12)


@st.composite
def split_minibatches(draw):
    """A minibatch of B responses (every length, NaN on padding through token_logprobs), advantages, a mode,
    a micro-batch size 1..B and a share of the rows for each of two processes."""
    rows = draw(st.lists(st.integers(0, len(RESPONSES) - 1), min_size=1, max_size=8))
    B = len(rows)
    return dict(
        responses=[RESPONSES[i] for i in rows],
        advantages=draw(reals(B)),
        mode=draw(st.sampled_from(MODES)),
        micro=draw(st.integers(1, B)),
        process=torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B))),
        max_new=draw(st.integers(MAX_LEN, 6)),
    )


def share_loss_and_gradient(theta, batch, rows: torch.Tensor, n_responses: int, n_tokens: int):
    """One process's share of the minibatch, in micro-batches: each recomputes its log-probs, weighs its tokens
    with the minibatch's global counts and backpropagates; losses and gradients are summed."""
    t = theta.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(rows), batch["micro"]):
        chunk = rows[start : start + batch["micro"]].tolist()
        logp, mask = token_logprobs(t, [batch["responses"][i] for i in chunk])
        advantages = torch.where(mask, batch["advantages"][chunk, None], math.nan)  # NaN on padding too
        w = grpo.token_weights(mask, batch["mode"], n_responses, n_tokens, batch["max_new"], dtype=torch.float64)
        loss = grpo.weighted_loss(-advantages * logp, w, mask)
        loss.backward()
        total = total + loss.detach()
    return total, t.grad if t.grad is not None else torch.zeros_like(theta)


@given(tables, split_minibatches())
def test_micro_batches_and_processes_sum_to_the_whole_minibatch_loss_and_gradient(theta, batch):
    """Σ over micro-batches (of any size 1..B) and over two processes' disjoint shares of Σ w·ℓ, with w from the
    minibatch's global N and token count, equals the loss and the gradient of one pass over the whole minibatch,
    in every mode; NaN on padding stays out. Per micro-batch counts would not (next test)."""
    _, mask = token_logprobs(theta, batch["responses"])
    B, n_tokens = len(mask), int(mask.sum())
    whole = dict(batch, micro=B)
    loss, gradient = share_loss_and_gradient(theta, whole, torch.arange(B), B, n_tokens)
    assert loss.isfinite() and gradient.isfinite().all()
    in_micro_batches = share_loss_and_gradient(theta, batch, torch.arange(B), B, n_tokens)
    shares = [share_loss_and_gradient(theta, batch, torch.nonzero(on).flatten(), B, n_tokens)
              for on in (batch["process"], ~batch["process"])]  # fmt: skip
    for split_loss, split_gradient in (in_micro_batches, [sum(x) for x in zip(*shares)]):
        assert_close(split_loss, loss, rtol=1e-12, atol=1e-14)
        assert_close(split_gradient, gradient, rtol=1e-12, atol=1e-14)


def test_normalising_each_micro_batch_by_its_own_token_count_changes_the_gradient():
    """Negative control, the bug veRL fixed twice: a token mean per micro-batch, averaged over micro-batches,
    weighs a short response's tokens more than a long one's. Responses of 1 and 3 tokens, micro-batches of 1:
    (ℓ_1 + (ℓ_2 + ℓ_3 + ℓ_4)/3)/2 instead of (ℓ_1 + ℓ_2 + ℓ_3 + ℓ_4)/4."""
    theta, responses, advantages = seeded_table(0), [(EOS,), (1, 2, EOS)], torch.tensor([1.0, 1.0], dtype=torch.float64)
    batch = dict(responses=responses, advantages=advantages, mode="token", micro=2, max_new=MAX_LEN)
    _, whole = share_loss_and_gradient(theta, batch, torch.arange(2), 2, 4)
    per_micro = sum(share_loss_and_gradient(theta, dict(batch, micro=1), torch.tensor([i]), 1, len(y))[1]
                    for i, y in enumerate(responses)) / 2  # fmt: skip
    assert (per_micro - whole).abs().max() > 0.01


# ---- The surrogate: PPO's clip with ε_low and ε_high, GSPO's sequence ratio, CISPO ----
def token_loss_and_gradient(logp, logp_old, advantages, eps, surrogate="clip"):
    """policy_loss on one-token responses: each token's loss ℓ, ∂ℓ/∂log π_θ by autograd, r and where the clip binds."""
    logp = logp[:, None].clone().requires_grad_(True)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, ratio, binds = grpo.policy_loss(logp, logp_old[:, None], advantages[:, None], mask, *eps, "token", surrogate)
    (gradient,) = torch.autograd.grad(loss.sum(), logp)
    return loss.detach().flatten(), gradient.flatten(), ratio.detach().flatten(), binds.flatten()


# Advantages below 1e-300 are drawn as 0: near the subnormals r·A and clip(r)·A round to one number, and no
# comparison of the two can see the clip (CI's derandomized run found A = 5e-324).
normal = lambda n: reals(n, -3, 3).map(lambda a: torch.where(a.abs() < 1e-300, 0.0, a))
tokens = st.integers(1, 8).flatmap(lambda n: st.tuples(reals(n, -1, 1), reals(n, -1, 1), normal(n)))
clip_ranges = st.tuples(st.floats(0.01, 0.5), st.floats(0.01, 0.5))  # ε_low, ε_high


def away_from_the_clip(ratio, eps) -> bool:
    """No r within 1e-9 of 1 − ε_low or 1 + ε_high, where the clipped loss has no derivative."""
    return bool(((ratio - (1 - eps[0])).abs().min() > 1e-9) and ((ratio - (1 + eps[1])).abs().min() > 1e-9))


@given(tokens, clip_ranges)
def test_the_clip_zeroes_the_gradient_exactly_where_it_binds_each_side_with_its_own_epsilon(tokens, eps):
    """ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A): ∂ℓ/∂log π_θ = −r·A, except where the clip binds, A > 0 and
    r > 1 + ε_high or A < 0 and r < 1 − ε_low, where it is 0 and `binds` says so: moving r further the way A favours
    earns nothing, moving it the other way is never spared. Each side has its own ε (DAPO's clip-higher)."""
    loss, gradient, ratio, binds = token_loss_and_gradient(*tokens, eps)
    _, _, advantages = tokens
    assume(away_from_the_clip(ratio, eps))
    expected_binds = ((advantages > 0) & (ratio > 1 + eps[1])) | ((advantages < 0) & (ratio < 1 - eps[0]))
    assert torch.equal(binds, expected_binds)
    assert_close(gradient, torch.where(expected_binds, 0.0, -ratio * advantages), rtol=1e-12, atol=0)
    assert_close(loss, -torch.minimum(ratio * advantages, ratio.clamp(1 - eps[0], 1 + eps[1]) * advantages))


@given(tokens, st.floats(0.01, 0.5))
def test_equal_epsilons_are_ppos_clip(tokens, eps):
    """ε_low = ε_high = ε: the surrogate is PPO's, −min(r·A, clip(r, 1 − ε, 1 + ε)·A), in value (here by hand, per
    token) and in gradient (0 exactly where r leaves [1 − ε, 1 + ε] the way A favours, −r·A elsewhere)."""
    loss, gradient, ratio, _ = token_loss_and_gradient(*tokens, (eps, eps))
    _, _, advantages = tokens
    assume(away_from_the_clip(ratio, (eps, eps)))
    for ell, g, r, a in zip(loss.tolist(), gradient.tolist(), ratio.tolist(), advantages.tolist()):
        clipped = min(max(r, 1 - eps), 1 + eps)
        assert ell == pytest.approx(-min(r * a, clipped * a), rel=1e-12, abs=1e-15)
        assert g == pytest.approx(0.0 if clipped * a < r * a else -r * a, rel=1e-12, abs=1e-15)


@given(tokens, clip_ranges)
def test_cispos_gradient_is_the_clipped_ratio_times_the_advantage_even_where_the_clip_binds(tokens, eps):
    """CISPO: ℓ = −sg[clip(r, 1 − ε_low, 1 + ε_high)]·A·log π_θ, so ∂ℓ/∂log π_θ = −clip(r)·A on every token. Where
    PPO's clip binds its gradient is 0; CISPO's is −(1 + ε_high)·A or −(1 − ε_low)·A: the token keeps learning.
    `binds` marks the tokens whose weight is clipped."""
    _, gradient, ratio, binds = token_loss_and_gradient(*tokens, eps, "cispo")
    _, ppo_gradient, _, ppo_binds = token_loss_and_gradient(*tokens, eps, "clip")
    _, _, advantages = tokens
    assume(away_from_the_clip(ratio, eps))
    clipped = ratio.clamp(1 - eps[0], 1 + eps[1])
    assert_close(gradient, -clipped * advantages, rtol=1e-12, atol=0)
    assert torch.equal(binds, clipped != ratio)
    assert (ppo_gradient[ppo_binds] == 0).all() and (gradient[ppo_binds & (advantages != 0)] != 0).all()


@given(tables, tables, st.lists(st.integers(0, len(RESPONSES) - 1), min_size=1, max_size=6), st.data(), clip_ranges)
def test_gspo_token_and_gspo_coincide_when_the_advantage_is_per_response(theta, theta_old, rows, data, eps):
    """GSPO maximises J = (1/N)·Σ_i min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i), one ratio and one clip per
    response, s_i = exp((1/|y_i|)·Σ_t log(π_θ/π_old)(a_t|s_t)). policy_loss with --ratio sequence computes GSPO-token,
    whose per-token ratio has the value s_i and the gradient s_i·∇log π_θ(a_t|s_t); averaged over each response's
    tokens and then over responses (token_weights' sequence mode), with A_i on every token of y_i, its loss is −J
    in value and gradient, NaN padding left out; and the clip binds on all of a response's tokens or on none."""
    responses = [RESPONSES[i] for i in rows]
    advantages = data.draw(reals(len(rows), -3, 3))
    logp_old, mask = token_logprobs(theta_old, responses)

    def gspo_token(t):
        logp, _ = token_logprobs(t, responses)
        per_token = torch.where(mask, advantages[:, None], math.nan)
        loss, _, binds = grpo.policy_loss(logp, logp_old, per_token, mask, *eps, "sequence")
        weights = grpo.token_weights(mask, "sequence", len(rows), int(mask.sum()), MAX_LEN, torch.float64)
        return grpo.weighted_loss(loss, weights, mask), binds

    def gspo(t):
        log_ratio = torch.where(mask, token_logprobs(t, responses)[0] - logp_old, 0.0)
        s = (log_ratio.sum(1) / mask.sum(1)).exp()
        return -torch.minimum(s * advantages, s.clamp(1 - eps[0], 1 + eps[1]) * advantages).mean(), s

    loss, binds = gspo_token(theta)
    expected, s = gspo(theta)
    assume(away_from_the_clip(s, eps))
    assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    assert_close(grad(lambda t: gspo_token(t)[0], theta), grad(lambda t: gspo(t)[0], theta), rtol=1e-9, atol=1e-12)
    assert all(len(set(row[m].tolist())) == 1 for row, m in zip(binds, mask))


# ---- Group advantages ----
def all_groups(K: int, G: int) -> torch.Tensor:
    """Every G-tuple of K one-token responses [K^G, G]."""
    return torch.cartesian_prod(*[torch.arange(K)] * G).view(-1, G)


def expected_group_gradient(theta, rewards, G: int, baseline: str, scale: bool, dynamic=False, shaped=None):
    """Prompt p's policy is softmax(θ[p]) over K one-token responses with rewards[p] [K]. The exact expectation,
    over every G-tuple of responses to every prompt, of the ascent step ∇ (1/(P·G))·Σ_p Σ_i A_{p,i}·log π(y_{p,i}|p):
    all K^G groups of a prompt go to group_advantages at once, one per row. The advantages come from `shaped`
    rewards [P, K] if given (the KL in the reward). dynamic=True: the expected step of a batch of groups drawn
    i.i.d. (the prompt uniform) and kept when grpo.scores_differ on their raw rewards, each group weighted by
    P(p, g)·keep(g) / P(keep)."""
    P, K = theta.shape
    groups = all_groups(K, G)
    pi = log_softmax(theta).exp()
    shaped = rewards if shaped is None else shaped
    weights = [pi[p][groups].prod(1, keepdim=True) for p in range(P)]
    if dynamic:
        weights = [w * grpo.scores_differ(rewards[p][groups])[:, None] for p, w in enumerate(weights)]
        kept = sum(w.sum() for w in weights) / P
        weights = [w / kept for w in weights]

    def surrogate(t):
        logp = log_softmax(t)
        total = 0.0
        for p in range(P):
            advantages = grpo.group_advantages(shaped[p][groups], baseline, scale)
            total = total + (weights[p] * advantages * logp[p][groups]).sum()
        return total / (P * G)

    return grad(surrogate, theta)


def two_prompt_reward_gradient(theta, rewards):
    """∇J, J = (1/P)·Σ_p Σ_y π(y|p)·r_p(y), by autograd of the exact J."""
    return grad(lambda t: (log_softmax(t).exp() * rewards).sum() / len(t), theta)


def scaled_weight(p: float, G: int) -> float:
    """w_G(p) = Σ_k C(G−1, k)·p^k·(1−p)^(G−1−k)·[z(1, k+1) − z(0, k)]: with rewards in {0, 1} and success rate p,
    response i's expected std-scaled group-mean advantage given r_i = 1 minus given r_i = 0, k the successes
    among the other G − 1. z(r, m) = (r − m/G)/s_m, s_m = sqrt(m(G − m)/(G(G − 1))) the sample std of m ones
    and G − m zeros, and z = 0 when m = 0 or G (constant group)."""

    def z(r, m):
        return 0.0 if m in (0, G) else (r - m / G) / math.sqrt(m * (G - m) / (G * (G - 1)))

    return sum(math.comb(G - 1, k) * p**k * (1 - p) ** (G - 1 - k) * (z(1, k + 1) - z(0, k)) for k in range(G))


two_prompts = st.integers(2, 3).flatmap(lambda k: st.tuples(logits_table(2, k), logits_table(2, k, -5, 5)))


@settings(max_examples=30)
@given(two_prompts, st.integers(2, 4))
def test_leave_one_out_advantages_give_exactly_the_policy_gradient(problem, G):
    """A_i = r_i − mean_{j≠i} r_j: the baseline is independent of y_i, so E[A_i·∇log π(y_i)] = ∇J_p and the
    expected step (1/(P·G))·Σ_{p,i} A_{p,i}·∇log π(y_{p,i}) is ∇J exactly, real rewards, two prompts."""
    theta, rewards = problem
    expected = two_prompt_reward_gradient(theta, rewards)
    assert_close(expected_group_gradient(theta, rewards, G, "leave-one-out", False), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=30)
@given(two_prompts, st.integers(2, 4))
def test_group_mean_advantages_give_g_minus_1_over_g_times_the_policy_gradient(problem, G):
    """A_i = r_i − mean_j r_j = (G − 1)/G·(r_i − mean_{j≠i} r_j), so the expected step is (G − 1)/G·∇J exactly:
    the baseline includes r_i, which shrinks the step but does not bias its direction."""
    theta, rewards = problem
    expected = (G - 1) / G * two_prompt_reward_gradient(theta, rewards)
    assert_close(expected_group_gradient(theta, rewards, G, "group-mean", False), expected, rtol=1e-9, atol=1e-12)


binary_rewards = st.lists(st.sampled_from([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), min_size=2, max_size=2)


@settings(max_examples=30)
@given(logits_table(2, 3), binary_rewards, st.integers(2, 4), st.sampled_from(["group-mean", "leave-one-out"]))
def test_std_scaled_advantages_weight_each_prompt_by_a_function_of_its_success_rate(theta, rewards, G, baseline):
    """Rewards in {0, 1}, p = Σ_{y correct} π(y) the prompt's success rate (J_p = p). The scaled advantage of y_i
    depends on y_i only through r_i, so each response contributes E[A_i·∇log π(y_i)] = Σ_r E[A_i | r_i = r]·∇P(r_i = r)
    = c·w_G(p)·∇p, and prompt p's block of the expected step is c·w_G(p)·∇p/P exactly, w_G from scaled_weight,
    c = 1 (group-mean) or G/(G − 1) (scaled leave-one-out advantages are G/(G − 1) times the group-mean ones)."""
    rewards = torch.tensor(rewards, dtype=torch.float64)
    step = expected_group_gradient(theta, rewards, G, baseline, True)
    c = 1.0 if baseline == "group-mean" else G / (G - 1)
    grad_p = grad(lambda t: (log_softmax(t).exp() * rewards).sum(), theta)  # row p: ∇p_p
    success = (log_softmax(theta).exp() * rewards).sum(1)
    expected = torch.stack([c * scaled_weight(success[p].item(), G) * grad_p[p] / 2 for p in range(2)])
    assert_close(step, expected, rtol=1e-9, atol=1e-12)


def test_std_scaling_reweights_prompts_from_g_4_with_binary_rewards_and_from_g_2_with_graded_ones():
    """Rewards in {0, 1}: w_G(p) is the constant (G − 1)/√G for G = 2, 3 (std scaling only rescales ∇J there:
    w_3(p) = 2/√3·((1 − p) + p)²), but for G = 4 it is symmetric in p ↔ 1 − p and grows as p moves away from
    ½, from 1.40 at p = ½ to 3/2 as p → 0 or 1: prompts nearly always or nearly never solved weigh more.
    So on two prompts with success rates 0.14 and ⅔ the expected step with G = 4 is off ∇J (1 − cos = 7e-5),
    with G = 2, 3 along it. With graded rewards (0, 1, 10) G = 2 is off ∇J too: there A_i = ±sign(r_i − r_j)/√2,
    a step on the probability of beating the other response, blind to how much better it is."""
    grid = [i / 20 for i in range(1, 20)]
    for G in (2, 3):
        assert all(abs(scaled_weight(p, G) - (G - 1) / math.sqrt(G)) < 1e-12 for p in grid)
    w4 = [scaled_weight(p, 4) for p in grid[9:]]  # p = ½, …, 0.95
    assert all(x < y for x, y in zip(w4, w4[1:]))
    assert all(abs(scaled_weight(p, 4) - scaled_weight(1 - p, 4)) < 1e-12 for p in grid)
    assert abs(scaled_weight(0.5, 4) - 1.3995) < 1e-4 and abs(scaled_weight(1e-9, 4) - 1.5) < 1e-6
    theta = torch.tensor([[0.0, 1.1, 1.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)  # p = 0.14 and ⅔
    grad_j = two_prompt_reward_gradient(theta, rewards)
    for G, baseline in itertools.product((2, 3, 4), ("group-mean", "leave-one-out")):
        cos = cosine(expected_group_gradient(theta, rewards, G, baseline, True), grad_j)
        assert (cos < 1 - 5e-5) if G == 4 else abs(cos - 1) < 1e-12
    real = torch.tensor([[0.0, 1.0, 10.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    step = expected_group_gradient(theta, real, 2, "group-mean", True)
    assert cosine(step, two_prompt_reward_gradient(theta, real)) < 1 - 1e-3


constants = st.one_of(
    st.sampled_from([0.0, 1.0, 1e6, -3.7, 0.1, -0.0, 1e-300]), st.floats(allow_nan=False, allow_infinity=False)
)


@given(constants, st.integers(1, 8), st.booleans(), st.sampled_from(["group-mean", "leave-one-out"]), st.data())
def test_a_group_whose_scores_are_all_equal_gets_advantage_exactly_zero(value, G, scale, baseline, data):
    """r_1 = … = r_G ⇒ A_i = 0 exactly, for both baselines, scaled or not, whatever the constant: never NaN (0/0),
    nor rounding over rounding (mean(0.1, 0.1, 0.1) ≠ 0.1 in floating point, and its deviations over their std are
    −0.82), nor −1.4e-11 over std + 1e-6; beside groups that are not constant, whose advantages stay finite."""
    assume(baseline == "group-mean" or G >= 2)
    other = data.draw(reals(G, -1e6, 1e6))
    scores = torch.stack([other, torch.full((G,), value, dtype=torch.float64)])
    advantages = grpo.group_advantages(scores, baseline, scale)
    assert (advantages[1] == 0).all() and advantages.isfinite().all()


@given(st.integers(2, 6).flatmap(lambda G: st.lists(reals(G, -100, 100), min_size=1, max_size=4)), st.booleans())
def test_advantages_are_the_centred_scores_over_the_sample_std(groups, scale):
    """Group by group, by hand: group-mean A_i = r_i − Σ_j r_j/G, leave-one-out A_i = r_i − Σ_{j≠i} r_j/(G − 1),
    and scaled by s = sqrt(Σ_j (r_j − mean r)²/(G − 1)) (groups spread by more than 1e-3)."""
    scores = torch.stack(groups)
    G = scores.shape[1]
    assume((scores.amax(1) - scores.amin(1) > 1e-3).all())
    for baseline in ("group-mean", "leave-one-out"):
        advantages = grpo.group_advantages(scores, baseline, scale)
        for row, r in zip(advantages, scores.tolist()):
            mean = sum(r) / G
            s = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1)) if scale else 1.0
            by_hand = [(x - (mean if baseline == "group-mean" else (sum(r) - x) / (G - 1))) / s for x in r]
            assert_close(row, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-9, atol=1e-9)


finite = st.floats(allow_nan=False, allow_infinity=False)


def near_constant(G: int):
    """Groups spread over many orders of magnitude, within a few ulps of each other, tiny (their squared
    deviations underflow), near the float maximum (their sum overflows), or anywhere in the float range."""
    anywhere = st.lists(finite, min_size=G, max_size=G).map(lambda xs: torch.tensor(xs, dtype=torch.float64))
    huge = st.tuples(reals(G, 1e308, 1.79e308), st.sampled_from([1.0, -1.0])).map(lambda x: x[0] * x[1])
    return st.one_of(reals(G, -1e6, 1e6), reals(G, 1, 1 + 1e-12), reals(G, -1e-300, 1e-300), huge, anywhere)


@given(st.integers(2, 8).flatmap(near_constant))
def test_advantages_are_finite_and_bounded_for_any_finite_scores(scores):
    """In exact arithmetic |r_i − mean r|/s ≤ (G − 1)/√G for the sample std s (one outlier attains it). Computed,
    they stay finite and within √(G − 1) (group-mean) or G/√(G − 1) (leave-one-out, G/(G − 1) times as large)
    for any finite scores: 0 and 1e-300, whose squared deviations underflow (s computed from them is 0 and
    A = ±inf), and scores near the float maximum, whose sum overflows (inf − inf = NaN); and within (G − 1)/√G
    when the spread is well above rounding: more than 1e-6 of the largest |r_i|, which is not subnormal (5e-324
    and 0 give 1 and 0: their mean rounds to one of them). Unscaled, an advantage past the float maximum is ±inf
    (r = ±1.7e308 are 3.4e308 apart), never NaN."""
    G = len(scores)
    group_mean = grpo.group_advantages(scores[None], "group-mean", True)
    leave_one_out = grpo.group_advantages(scores[None], "leave-one-out", True)
    assert group_mean.isfinite().all() and leave_one_out.isfinite().all()
    assert group_mean.abs().max() <= math.sqrt(G - 1) * (1 + 1e-12)
    assert leave_one_out.abs().max() <= G / math.sqrt(G - 1) * (1 + 1e-12)
    if scores.max() - scores.min() > 1e-6 * scores.abs().max() and scores.abs().max() > 1e-300:  # not subnormal
        assert group_mean.abs().max() <= (G - 1) / math.sqrt(G) * (1 + 1e-6)
    if scores.min() < scores.max():  # not constant: some response is preferred
        assert (group_mean != 0).any()
    for baseline in ("group-mean", "leave-one-out"):
        assert not grpo.group_advantages(scores[None], baseline, False).isnan().any()


@given(
    st.integers(1, 6).flatmap(
        lambda P: st.one_of(reals(P * 4, -3, 3), st.lists(finite, min_size=P * 4, max_size=P * 4))
    )
)
def test_batch_scaling_divides_every_advantage_by_one_standard_deviation(advantages):
    """--scale-advantages batch: A / sqrt(mean A²) with one divisor for the whole batch (centred advantages: the
    RMS is their std), so each prompt keeps its weight relative to the others: the result is c·A for one c > 0
    (to 1e-12 of its largest entry: an entry 1e-300 of the largest underflows) with RMS 1, for any finite A, those
    whose squares overflow (1e200) or underflow (5e-324) included; a batch of zeros stays zeros, not NaN."""
    advantages = torch.as_tensor(advantages, dtype=torch.float64)
    scaled = grpo.scale_by_batch_std(advantages)
    assert scaled.isfinite().all()
    largest = advantages.abs().max()
    if largest > 0:
        c = scaled[advantages.abs().argmax()].abs()  # c·largest
        assert_close(scaled, advantages / largest * c, rtol=1e-12, atol=1e-12 * c.item())
        assert_close(scaled.pow(2).mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert_close(grpo.scale_by_batch_std(torch.zeros_like(advantages)), torch.zeros_like(advantages), rtol=0, atol=0)


def shaped_batch(scores, kl_per_token, mask):
    """A batch as batch_advantages reads it: raw scores [B], and log π_old − log π_ref = kl_per_token [B, T] on the
    valid tokens (NaN on padding)."""
    logp_old = torch.where(mask, -1.0, math.nan)
    return dict(scores=scores, mask=mask, logp_old=logp_old, logp_ref=logp_old - kl_per_token)


groups_of_equal_scores = st.integers(2, 5).flatmap(
    lambda G: st.tuples(st.just(G), st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=4), st.data())
)


@given(groups_of_equal_scores, st.floats(0.01, 1), st.sampled_from(["leave-one-out", "group-mean"]))
def test_with_the_kl_in_the_reward_the_advantages_are_those_of_the_score_minus_beta_times_the_summed_k1(
    problem, beta, baseline
):
    """--kl-penalty k1-reward: R_i = r_i − β·Σ_t log(π_old/π_ref)(a_t|s_t) over y_i's valid tokens, and A_i its
    advantage within the group: in groups whose raw scores are all equal, A_i = −β·(K_i − mean_{j≠i} K_j), K_i the
    summed k1 (leave-one-out; by hand), not 0. With the KL in the loss, the advantages are the raw scores'."""
    G, values, data = problem
    scores = torch.tensor(values, dtype=torch.float64).repeat_interleave(G)  # every group of equal scores
    mask = torch.tensor([[True] * n + [False] * (3 - n) for n in data.draw(st.lists(st.integers(1, 3),
                        min_size=len(scores), max_size=len(scores)))])  # fmt: skip
    kl = torch.where(mask, data.draw(reals(mask.numel(), -2, 2)).view(mask.shape), math.nan)
    batch = shaped_batch(scores, kl, mask)
    args = grpo.Args(group_size=G, baseline=baseline, scale_advantages="none")
    rewards, advantages = grpo.batch_advantages(batch, args, beta)
    K = torch.where(mask, kl, 0.0).sum(1)
    assert_close(rewards, scores - beta * K, rtol=1e-12, atol=1e-12)
    for a, k in zip(advantages.view(-1, G).tolist(), K.view(-1, G).tolist()):
        others = [(sum(k) - x) / (G - 1) if baseline == "leave-one-out" else sum(k) / G for x in k]
        assert a == pytest.approx([-beta * (x - o) for x, o in zip(k, others)], rel=1e-9, abs=1e-12)
    in_the_loss = grpo.batch_advantages(batch, dataclasses.replace(args, kl_penalty="k3-loss"), beta)
    assert (in_the_loss[1] == 0).all() and torch.equal(in_the_loss[0], scores)


@given(st.integers(2, 5).flatmap(lambda G: st.tuples(st.just(G), reals(3 * G, -3, 3))))
def test_batch_scaling_divides_every_groups_advantages_by_one_divisor_not_by_each_groups_own_std(problem):
    """--scale-advantages batch in batch_advantages: A = (unscaled advantages)·c with one c > 0 for every group,
    whatever each group's spread: a group twice as spread keeps twice the advantages."""
    G, scores = problem
    groups = scores.view(3, G)
    assume((groups.amax(1) - groups.amin(1) > 1e-3).all())
    scores = scores * torch.tensor([1.0, 2.0, 10.0], dtype=torch.float64).repeat_interleave(G)  # spreads differ
    plain = grpo.batch_advantages(dict(scores=scores), grpo.Args(group_size=G, scale_advantages="none"), 0.0)[1]
    scaled = grpo.batch_advantages(dict(scores=scores), grpo.Args(group_size=G, scale_advantages="batch"), 0.0)[1]
    c = scaled.norm() / plain.norm()
    assert c > 0 and c.isfinite()
    assert_close(scaled, c * plain, rtol=1e-9, atol=1e-12)


@given(st.integers(2, 5).flatmap(lambda G: reals(G, 0, 3)), st.sampled_from([0.0, 1.0]))
def test_group_scaling_with_the_kl_in_the_reward_makes_beta_vanish_on_groups_of_equal_scores(kl, score):
    """Why grpo.py refuses --scale-advantages group with --kl-penalty k1-reward and β > 0: a group of equal raw
    scores c has R_i = c − β·K_i, and R_i − mean R over std(R) = −(K_i − mean K)/std(K), the same at β = 1e-4 as at
    β = 1: β stops mattering exactly on the prompts the policy has mastered (or never solves)."""
    assume(kl.max() - kl.min() > 1e-3)
    G = len(kl)
    for beta in (1e-4, 1.0):
        advantages = grpo.group_advantages((score - beta * kl)[None], "group-mean", True)[0]
        assert_close(advantages, -(kl - kl.mean()) / kl.std(), rtol=1e-6, atol=1e-9)
    assert G >= 2


def batch_scaled_expected_step(theta, rewards, G: int) -> torch.Tensor:
    """The exact E[step] of --scale-advantages batch on a batch of one group of each of two prompts: every pair of
    G-tuples (K^G each), its advantages from grpo.batch_advantages, the step (1/(P·G))·Σ_{p,i} A_{p,i}·∇log π."""
    P, K = theta.shape
    groups = all_groups(K, G)
    prob = [log_softmax(theta[p]).exp()[groups].prod(1) for p in range(P)]
    args = grpo.Args(group_size=G, scale_advantages="batch")
    W = torch.zeros(P, K, dtype=torch.float64)  # Σ over batches of P(batch)·A for each prompt's responses
    for a, b in itertools.product(range(len(groups)), repeat=2):
        scores = torch.cat([rewards[0][groups[a]], rewards[1][groups[b]]])
        advantages = grpo.batch_advantages(dict(scores=scores), args, 0.0)[1].view(P, G)
        W[0].index_add_(0, groups[a], prob[0][a] * prob[1][b] * advantages[0])
        W[1].index_add_(0, groups[b], prob[0][a] * prob[1][b] * advantages[1])
    return grad(lambda t: (W * log_softmax(t)).sum() / (P * G), theta)


TWO_PROMPTS = torch.tensor([[0.0, 1.1, 1.1], [0.0, 0.0, 0.0]], dtype=torch.float64)  # success rates 0.14 and ⅔
BINARY = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
GRADED = torch.tensor([[0.0, 1.0, 10.0], [0.0, 0.0, 0.0]], dtype=torch.float64)


def test_batch_scaling_is_off_grad_j_for_a_finite_batch():
    """Negative control. Leave-one-out advantages are exactly along ∇J (above), but divided by the batch's RMS, a
    random divisor that depends on the responses, they are not: a group's contribution is larger when the rest of
    the batch happens to have small advantages. On two prompts, one group each, 1 − cos(E[step], ∇J) is 3.6e-4
    (G = 2) and 9.0e-4 (G = 3) with binary rewards, and 2.6e-2 and 7.9e-3 with graded ones (0, 1, 10)."""
    for rewards, low in ((BINARY, 1e-4), (GRADED, 5e-3)):
        grad_j = two_prompt_reward_gradient(TWO_PROMPTS, rewards)
        for G in (2, 3):
            assert low < 1 - cosine(batch_scaled_expected_step(TWO_PROMPTS, rewards, G), grad_j) < 0.1


def batch_scaled_expected_step_of_m_groups_each(theta, rewards, G: int, m: int) -> torch.Tensor:
    """E[step] of batch scaling on a batch of m groups of each of two prompts, exactly, without enumerating
    (K^G)^(2m) batches: a group g of prompt p is scaled by sqrt(nG/(s_g + S)), n = 2m groups, s_g = Σ_i A_{g,i}² its
    squared (unscaled, leave-one-out) advantages and S those of the 2m − 1 others, whose distribution is the
    convolution of each prompt's distribution of s (rounded to 1e-9 to merge equal sums)."""
    P, K = theta.shape
    groups = all_groups(K, G)
    prob = [log_softmax(theta[p]).exp()[groups].prod(1) for p in range(P)]
    advantages = [grpo.group_advantages(rewards[p][groups], "leave-one-out", False) for p in range(P)]
    squares = [a.pow(2).sum(1) for a in advantages]

    def convolve(d, e):
        out = {}
        for (x, p), (y, q) in itertools.product(d.items(), e.items()):
            out[round(x + y, 9)] = out.get(round(x + y, 9), 0.0) + p * q
        return out

    one = [{} for _ in range(P)]
    for p in range(P):
        for w, s in zip(prob[p].tolist(), squares[p].tolist()):
            one[p][round(s, 9)] = one[p].get(round(s, 9), 0.0) + w
    W = torch.zeros(P, K, dtype=torch.float64)
    for p in range(P):
        others = functools.reduce(convolve, [one[p]] * (m - 1) + [one[1 - p]] * m, {0.0: 1.0})
        S, P_S = (torch.tensor(list(x), dtype=torch.float64) for x in (others.keys(), others.values()))
        total = squares[p][:, None] + S
        scale = torch.where(total > 0, (2 * m * G / total.clamp(min=1e-300)).sqrt(), 0.0) @ P_S  # E[1/RMS | g]
        W[p].index_add_(0, groups.flatten(), ((prob[p] * scale)[:, None] * advantages[p]).flatten())
    return grad(lambda t: (W * log_softmax(t)).sum() / (P * G), theta)


def test_batch_scaling_approaches_grad_j_as_the_batch_grows():
    """Consistency: the batch's RMS tends to a constant as the batch grows, so E[step] tends to ∇J over it. With m
    groups of each of the two prompts, binary rewards, exactly: the same as the enumeration for m = 1, and
    1 − cos(E[step], ∇J) falls at every doubling of m, about 4-fold, to below 2e-6 at m = 32 (64 groups)."""
    grad_j = two_prompt_reward_gradient(TWO_PROMPTS, BINARY)
    for G in (2, 3):
        steps = {
            m: batch_scaled_expected_step_of_m_groups_each(TWO_PROMPTS, BINARY, G, m) for m in (1, 2, 4, 8, 16, 32)
        }
        assert_close(steps[1], batch_scaled_expected_step(TWO_PROMPTS, BINARY, G), rtol=1e-9, atol=1e-12)
        gaps = [1 - cosine(step, grad_j) for step in steps.values()]
        assert all(a > b > 0 for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 2e-6


tied_rewards = st.integers(2, 3).flatmap(
    lambda k: st.tuples(logits_table(2, k), st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=2 * k, max_size=2 * k))
)


@settings(max_examples=30)
@given(tied_rewards, st.integers(2, 4), st.sampled_from(["group-mean", "leave-one-out"]), st.booleans())
def test_dynamic_sampling_divides_the_expected_step_by_the_chance_that_a_groups_scores_differ(
    problem, G, baseline, scale
):
    """Groups drawn i.i.d. and kept when their scores differ (grpo.scores_differ) are i.i.d. from the kept groups.
    A group of equal scores has A = 0: dropping it removes nothing from Σ A·∇log π, only from the count, so the
    expected step of a batch of kept groups is the step without the filter divided by q = P(a group's scores
    differ) = 1 − mean_p Σ_v P_p(r = v)^G (by hand): along ∇J (leave-one-out), larger by 1/q, whatever the baseline
    and the group's std. Prompt by prompt it is ∇J_p/q, not ∇J_p/q_p: a prompt kept less often weighs the same."""
    theta, values = problem
    rewards = torch.tensor(values, dtype=torch.float64).view(2, -1)
    pi = log_softmax(theta).exp()
    q = 1 - sum(sum((pi[p] * (rewards[p] == v)).sum() ** G for v in set(values)) for p in range(2)) / 2
    assume(q > 1e-6)
    plain = expected_group_gradient(theta, rewards, G, baseline, scale)
    dynamic = expected_group_gradient(theta, rewards, G, baseline, scale, dynamic=True)
    assert_close(dynamic * q, plain, rtol=1e-9, atol=1e-12)


def test_with_the_kl_in_the_reward_dynamic_sampling_drops_the_kl_gradient_of_prompts_whose_scores_are_equal():
    """Negative control, why a β > 0 in the reward and dynamic sampling do not mix freely: with R = r − β·k1 the
    step without the filter is ∇(J − β·KL(π_θ‖π_ref)) exactly (KL averaged over the prompts). The filter reads the
    raw score r, as it must (R differs in nearly every group, and filtering on it would drop nothing); so on a
    prompt every response solves, every group is dropped, and with it that prompt's pull toward π_ref: its block
    of the expected step is 0, where ∇(J − β·KL)'s is −β·∇KL_p/2 ≠ 0."""
    theta, theta_ref, beta = seeded_table(0, 2, 3), seeded_table(1, 2, 3), 0.5
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)  # prompt 1: always solved
    shaped = rewards - beta * (log_softmax(theta) - log_softmax(theta_ref))
    kl = lambda t: (log_softmax(t).exp() * (log_softmax(t) - log_softmax(theta_ref))).sum() / 2
    objective = grad(lambda t: (log_softmax(t).exp() * rewards).sum() / 2 - beta * kl(t), theta)
    plain = expected_group_gradient(theta, rewards, 3, "leave-one-out", False, shaped=shaped)
    dynamic = expected_group_gradient(theta, rewards, 3, "leave-one-out", False, dynamic=True, shaped=shaped)
    assert_close(plain, objective, rtol=1e-9, atol=1e-12)
    pull = -beta * grad(kl, theta)[1]  # ∇J_1 = 0: prompt 1's block of ∇(J − β·KL) is the KL's alone
    assert_close(plain[1], pull, rtol=1e-9, atol=1e-12)
    assert (dynamic[1] == 0).all() and pull.abs().max() > 0.01


# ---- The script ----
SMALL = ["--num-prompts", "8", "--group-size", "2", "--num-minibatches", "2", "--ppo-epochs", "2"]
SMALL += ["--max-new-tokens", "4", "--total-episodes", "32", "--eval-every", "1000000"]


@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory):
    """A tiny float64 GPT-2 policy, loaded as the script loads one."""
    return grpo.load_policy(
        str(tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")), torch.device("cpu"), torch.float64
    )


def updated_agent(policy, minibatches, prompt_width, **flags):
    """A copy of policy (as the agent the script steps) after one update_minibatch per minibatch, β = 0.1."""
    agent = grpo.PolicyLogProbs(copy.deepcopy(policy))
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, fused=True)
    args = grpo.Args(temperature=1.0, max_new_tokens=4, **flags)
    for minibatch in minibatches:
        grpo.update_minibatch(agent.train(), optimizer, minibatch, prompt_width, args, beta=0.1)
    return agent.eval()


def update_params(policy, minibatches, prompt_width, **flags):
    """The parameters of a copy of policy after one update_minibatch per minibatch."""
    return torch.cat(
        [p.detach().flatten() for p in updated_agent(policy, minibatches, prompt_width, **flags).parameters()]
    )


@pytest.mark.parametrize(
    "aggregation, kl, ratio, surrogate",
    [(mode, kl, "token", "clip") for mode in MODES for kl in ("k1-reward", "k3-loss")]
    + [("sequence", "k1-reward", "sequence", "clip"), ("token", "k3-loss", "sequence", "cispo")],
)
def test_micro_batching_leaves_the_same_parameters(gpt2_64, aggregation, kl, ratio, surrogate):
    """Two steps on minibatches of 8 responses of different lengths, accumulated over micro-batches of 1, 3 or 8:
    the same parameters to 1e-10 in float64, for every loss aggregation, with the KL in the reward or in the
    loss, GSPO's ratio and CISPO: each token's weight comes from the whole minibatch's counts, not from its
    micro-batch's, and a response's ratio from its own tokens."""
    policy, tok = gpt2_64
    torch.manual_seed(0)
    ids, attn, prompt_width, mask, _ = grpo.sample(policy, tok, [f"{i}+{2 * i}=" for i in range(16)], 4, 1.0, 16)
    with torch.no_grad():
        logp_old = grpo.token_logprobs(policy, ids, attn, prompt_width, 1.0)[0]
    assert len(set(mask.sum(1).tolist())) > 1  # responses of several lengths: the aggregations differ
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, logp_ref=logp_old + 0.1 * torch.randn(mask.shape),
                 advantages=torch.randn(16, dtype=torch.float64))  # fmt: skip
    minibatches = [{k: v[i : i + 8] for k, v in batch.items()} for i in (0, 8)]
    flags = dict(loss_aggregation=aggregation, kl_penalty=kl, ratio=ratio, surrogate=surrogate, clip_range_high=0.28)
    whole = update_params(policy, minibatches, prompt_width, micro_batch_size=8, **flags)
    for size in (1, 3):
        assert_close(
            update_params(policy, minibatches, prompt_width, micro_batch_size=size, **flags), whole, rtol=0, atol=1e-10
        )
    assert (whole - update_params(policy, [], prompt_width)).abs().max() > 1e-4  # the steps did move the parameters


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory):
    """The embedded policy with dropout 0.5 in its config, which the update's training mode would apply if
    load_policy did not switch it off. (A random model's responses seldom stop and all score 0: no advantage.)"""
    path = tmp_path_factory.mktemp("dropout")
    shutil.copytree(CHECKPOINT, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps(config | {k: 0.5 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")})
    )
    return path


@pytest.mark.slow
def test_the_first_minibatchs_ratio_is_one_before_the_first_step(tmp_path, dropout_checkpoint):
    """π_θ/π_old = 1 within 1e-6 in float32 before the first step of every iteration (the sampler's forward,
    mask, positions and temperature, no dropout), and the later steps do move it; the KL in the loss is logged."""
    flags = ["--temperature", "0.7", "--learning-rate", "1e-3", "--kl-coef", "0.1", "--kl-penalty", "k3-loss"]
    _, rows = run_script("grpo.py", "--model", str(dropout_checkpoint), *SMALL, *flags, out_dir=tmp_path)
    assert [r["episodes"] for r in rows] == [0, 16, 32]
    for row in rows[1:]:
        assert row["first_minibatch_ratio_error"] <= 1e-6 and row["ratio_max"] > 1 + 1e-4 and row["kl_loss"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("kl_coef, loads", [("0", 1), ("0.1", 2)])
def test_a_reference_policy_is_loaded_only_when_beta_is_positive(tmp_path, monkeypatch, kl_coef, loads):
    calls, load = [], grpo.load_policy
    monkeypatch.setattr(grpo, "load_policy", lambda *a, **k: calls.append(a[0]) or load(*a, **k))
    rows = run_main(grpo, *SMALL, "--kl-coef", kl_coef, "--output-dir", str(tmp_path))
    assert len(calls) == loads and ("kl" in rows[0]) == (loads == 2)
    for row in rows:  # with the KL in the reward (the default), R = score − β·Σ_t k1 per response
        assert row["reward_mean"] == pytest.approx(row["score_mean"] - float(kl_coef) * row.get("kl", 0), abs=1e-6)


@pytest.mark.parametrize("kl", ["k1-reward", "k2-loss", "k3-loss"])
def test_the_kl_in_the_loss_pulls_the_policy_toward_pi_ref_where_no_advantage_does(gpt2_64, kl):
    """Every advantage 0 and π_ref ≠ π_old: with β·k2 or β·k3 in the loss the step descends the estimator (the
    loss adds β·k, never subtracts it): the mean k over the batch's tokens falls. With the KL in the reward
    (already in the advantages, here 0) the policy does not move."""
    policy, tok = gpt2_64
    torch.manual_seed(1)
    ids, attn, prompt_width, mask, _ = grpo.sample(policy, tok, [f"{i}+{5 * i}=" for i in range(8)], 4, 1.0, 8)
    with torch.no_grad():
        logp_old = grpo.token_logprobs(policy, ids, attn, prompt_width, 1.0)[0]
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, logp_ref=logp_old + torch.randn(mask.shape),
                 advantages=torch.zeros(8, dtype=torch.float64))  # fmt: skip
    agent = updated_agent(policy, [batch], prompt_width, kl_penalty=kl)
    moved = (
        (update_params(policy, [batch], prompt_width, kl_penalty=kl) - update_params(policy, [], prompt_width))
        .abs()
        .max()
    )
    assert (moved > 1e-4) == (kl != "k1-reward")
    if kl != "k1-reward":
        estimator = kl.removesuffix("-loss")

        def mean_kl(model):
            with torch.no_grad():
                logp = grpo.token_logprobs(model, ids, attn, prompt_width, 1.0)[0]
            return grpo.kl_penalty(logp, batch["logp_ref"], estimator)[mask].mean()

        assert mean_kl(agent.policy) < mean_kl(policy) - 1e-4


def fake_rollout(rounds: list):
    """A stand-in for grpo.rollout: call k returns a batch whose groups score rounds[k] (a list of groups), with
    prompts of width 2 + k and responses of 1 + k tokens, and row j in sampling order marked `row` = j. Returns
    it and its list of calls."""
    calls = []

    def rollout(policy, tok, prompts, args):
        k, first = len(calls), sum(len(r) * len(r[0]) for r in rounds[: len(calls)])
        calls.append(prompts)
        scores = torch.tensor(rounds[k], dtype=torch.float64).flatten()
        B, n, T = len(scores), 2 + k, 1 + k
        batch = dict(ids=torch.full((B, n + T), 5), attn=torch.ones(B, n + T, dtype=torch.long), scores=scores,
                     mask=torch.ones(B, T, dtype=torch.bool), row=torch.arange(first, first + B))  # fmt: skip
        assert len(prompts) == B
        return batch, n

    return rollout, calls


@pytest.mark.parametrize("max_rounds, rounds, sampled_rounds, rows", [
    (3, [[[1, 1], [0, 1]], [[0, 0], [1, 0]], [[0, 1], [1, 0]]], 2, [2, 3, 6, 7]),  # 2 differ after 2 rounds: stop
    (2, [[[1, 1], [1, 1]], [[0, 1], [0, 0]]], 2, [0, 1, 4, 5]),  # 1 of 2 after the last round: topped up
    (1, [[[1, 1], [0, 1]]], 1, [0, 1, 2, 3]),  # off: the rollout's batch
])  # fmt: skip
def test_collect_keeps_the_first_groups_whose_raw_scores_differ_in_the_order_sampled(
    monkeypatch, max_rounds, rounds, sampled_rounds, rows
):
    """Dynamic sampling: rounds of --num-prompts new prompts until that many groups have two different raw scores
    (or --max-sampling-rounds are done, when the first groups of equal scores top the batch up), the groups kept
    in the order sampled; the KL in the reward (β = 0.1 here, every shaped reward differs) plays no part. The
    scores of every group sampled come back for the log; with one round the batch is the rollout's, unchanged.
    Only the batch kept is scored by π_old and π_ref."""
    rollout, calls = fake_rollout(rounds)
    monkeypatch.setattr(grpo, "rollout", rollout)
    scored = []
    monkeypatch.setattr(grpo, "score", lambda policy, ref, batch, n, args: scored.append(batch) or batch)
    args = grpo.Args(group_size=2, max_sampling_rounds=max_rounds, kl_coef=0.1, kl_penalty="k1-reward")
    batch, prompt_width, sampled = grpo.collect(None, SimpleNamespace(pad_token_id=0), random.Random(0), args, None, 2)
    assert len(calls) == sampled_rounds and all(p[0] == p[1] and p[2] == p[3] for p in calls)  # G of each prompt
    scores = torch.tensor(rounds[:sampled_rounds], dtype=torch.float64).flatten()
    assert batch["row"].tolist() == rows and torch.equal(batch["scores"], scores[rows]) and scored == [batch]
    assert torch.equal(sampled, scores.view(-1, 2))
    assert prompt_width == 1 + sampled_rounds and batch["ids"].shape[1] == prompt_width + sampled_rounds
    if max_rounds == 1:
        alone, _ = fake_rollout(rounds)[0](None, None, ["p"] * 4, args)
        assert all(torch.equal(batch[k], alone[k]) for k in alone)


def test_joined_rollouts_score_the_same_log_probs_as_apart(gpt2_64):
    """join pads each rollout's prompts on the left and its responses on the right to the widest: the rows keep
    their prompt and response tokens, masks and scores, and π_θ scores the joined batch as it scored each alone
    (the log-probs and entropies on every response token, to 1e-10 in float64)."""
    policy, tok = gpt2_64
    torch.manual_seed(2)
    parts = [grpo.rollout(policy, tok, prompts, grpo.Args(temperature=1.0, max_new_tokens=k))
             for prompts, k in ((["1+2=", "3+4="], 2), (["12+34=", "56+7="], 4), (["99+99="], 3))]  # fmt: skip
    joined, prompt_width = grpo.join(parts, tok.pad_token_id)
    assert prompt_width == max(n for _, n in parts) > min(n for _, n in parts) and joined["mask"].shape[1] == 4
    with torch.no_grad():
        logp, entropy = grpo.token_logprobs(policy, joined["ids"], joined["attn"], prompt_width, 1.0, entropy=True)
        for batch, n in parts:
            batch["logp_old"], batch["entropy"] = grpo.token_logprobs(policy, batch["ids"], batch["attn"], n, 1.0,
                                                                      entropy=True)  # fmt: skip
    rows = 0
    for batch, n in parts:
        B, T = batch["mask"].shape
        own = slice(rows, rows + B)
        assert torch.equal(joined["ids"][own, prompt_width - n : prompt_width + T], batch["ids"])
        assert torch.equal(joined["attn"][own, prompt_width - n : prompt_width + T], batch["attn"])
        assert not joined["attn"][own, : prompt_width - n].any() and not joined["attn"][own, prompt_width + T :].any()
        assert torch.equal(joined["mask"][own, :T], batch["mask"]) and not joined["mask"][own, T:].any()
        assert torch.equal(joined["scores"][own], batch["scores"])
        mask = batch["mask"]
        assert_close(logp[own, :T][mask], batch["logp_old"][mask], rtol=0, atol=1e-10)
        assert_close(entropy[own, :T][mask], batch["entropy"][mask], rtol=0, atol=1e-10)
        rows += B


@pytest.mark.slow
def test_dynamic_sampling_trains_each_iteration_on_groups_whose_scores_differ(tmp_path, monkeypatch):
    """End to end with --max-sampling-rounds 3: each iteration's batch holds --num-prompts groups whose scores
    differ, unless 3 rounds were sampled (then it was topped up); the row's sampling_rounds and equal_score_groups
    are those of every group sampled, the batch's and the dropped ones."""
    seen, collect = [], grpo.collect
    monkeypatch.setattr(grpo, "collect", lambda *a: seen.append(collect(*a)) or seen[-1])
    rows = run_main(grpo, *SMALL, "--max-sampling-rounds", "3", "--output-dir", str(tmp_path))
    assert len(seen) == len(rows) == 3 and any(len(sampled) > 8 for _, _, sampled in seen)
    for (batch, _, sampled), row in zip(seen, rows):
        groups = batch["scores"].view(-1, 2)
        assert len(groups) == 8 and row["sampling_rounds"] == len(sampled) / 8 in (1, 2, 3)
        assert grpo.scores_differ(groups).all() or row["sampling_rounds"] == 3
        assert row["equal_score_groups"] == pytest.approx((~grpo.scores_differ(sampled)).double().mean().item())


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics_and_a_copy_alone_runs(tmp_path):
    """Row for row apart from `seconds`, the second run from a copy of grpo.py alone in another folder, with
    the paper's choices and the KL in the loss."""
    flags = [*SMALL, "--model", str(CHECKPOINT), "--baseline", "group-mean", "--scale-advantages", "group",
             "--loss-aggregation", "sequence", "--kl-coef", "0.05", "--kl-penalty", "k3-loss"]  # fmt: skip
    shutil.copy(ROOT / "grpo.py", tmp_path / "grpo.py")
    runs = [run_script(script, *flags, out_dir=tmp_path / str(i), cwd=tmp_path)[1]
            for i, script in enumerate(["grpo.py", tmp_path / "grpo.py"])]  # fmt: skip
    assert without_seconds(runs[0]) == without_seconds(runs[1]) and len(runs[0]) == 3


@pytest.mark.slow
def test_default_run_improves_eval_accuracy_on_a_fixed_budget(tmp_path):
    _, rows = run_script("grpo.py", "--total-episodes", "2048", "--eval-every", "2048", out_dir=tmp_path)
    assert rows[-1]["episodes"] == 2048 and rows[-1]["eval_accuracy"] >= rows[0]["eval_accuracy"] + 0.1


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "1"], "--baseline leave-one-out and --scale-advantages batch need --group-size >= 2"),
    (["--num-prompts", "6", "--num-minibatches", "5", "--group-size", "2"],
     "--num-prompts 6 x --group-size 2 must split into --num-minibatches 5"),
    (["--kl-penalty", "k4-loss"], "--kl-penalty expects one of k1-reward, k2-loss, k3-loss, got 'k4-loss'"),
    (["--loss-aggregation", "mean"], "--loss-aggregation expects one of token, sequence, constant, got 'mean'"),
    (["--clip-range", "0"], "--clip-range must be > 0"),
    (["--clip-range-high", "-0.1"], "--clip-range-high must be > 0"),
    (["--max-sampling-rounds", "0"], "--max-sampling-rounds must be >= 1"),
    (["--ratio", "response"], "--ratio expects one of token, sequence, got 'response'"),
    (["--surrogate", "ppo"], "--surrogate expects one of clip, cispo, got 'ppo'"),
    (["--scale-advantages", "group", "--kl-coef", "0.1"],
     "--scale-advantages group with the KL in the reward (--kl-penalty k1-reward) makes a group of equal scores"),
])  # fmt: skip
def test_bad_input_is_one_error_line_before_any_work(monkeypatch, capsys, tmp_path, flags, message):
    argv = ["grpo.py", *SMALL, *flags, "--output-dir", str(tmp_path / "run")]
    assert_one_error_line_before_any_work(exit_message(monkeypatch, grpo.main, argv), message, capsys, tmp_path / "run")
