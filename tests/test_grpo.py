"""grpo.py: GRPO's three contested choices (advantages, KL penalty, loss aggregation) proved by exact
enumeration, never by sampling, on the functions the script trains with: every response of an enumerable
tabular policy, every N-tuple of a minibatch, every G-tuple of a group, in float64. Each test's name states
the fact and its docstring the equation. Then the script: the ratio before the first step, micro-batching,
β = 0 without π_ref, and end to end.

Notation: π = π_θ, y = (a_0, …, a_{|y|−1}) a response, s_t = a_<t the state token a_t is chosen in, d(s) the
probability that π reaches state s, J = E_{y~π}[R(y)], ∇ = ∇_θ. "Expected gradient" is E_y[∇ loss(y)]: the
sampling distribution is held fixed, as it is when a sampled batch is differentiated."""

import copy
import functools
import itertools
import json
import math
import shutil

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


def sequence_kl_gradient(theta, theta_ref, reverse: bool = False, max_len: int = MAX_LEN):
    """∇ KL(π(y)‖π_ref(y)) = ∇ Σ_y π(y)·log(π(y)/π_ref(y)), or ∇ KL(π_ref(y)‖π(y)), of the exact sequence KL."""
    responses = all_responses(max_len)
    logp_ref = sequence_logprobs(theta_ref, responses, max_len)

    def kl(t):
        logp = sequence_logprobs(t, responses, max_len)
        return (logp_ref.exp() * (logp_ref - logp)).sum() if reverse else (logp.exp() * (logp - logp_ref)).sum()

    return grad(kl, theta)


def per_state_kl_gradient(theta, theta_ref, reverse: bool = False, max_len: int = MAX_LEN, d=None):
    """Σ_s d(s)·∇ KL(π(·|s)‖π_ref(·|s)) (or of KL(π_ref(·|s)‖π(·|s))) with d held fixed: each state's KL is
    differentiated, the probability of reaching the state is not. d defaults to π's state distribution."""
    d = state_probs(theta, max_len) if d is None else d
    logp_ref = log_softmax(theta_ref)

    def kl(t):
        logp = log_softmax(t)
        per_state = logp_ref.exp() * (logp_ref - logp) if reverse else logp.exp() * (logp - logp_ref)
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
def test_one_token_k2_in_the_loss_has_the_gradient_of_the_forward_kl(logits):
    """E_π[∇ ½(log π − log π_ref)²] = Σ_y ∇π(y)·log(π/π_ref)(y) = ∇ KL(π‖π_ref), as Σ_y π·∇log π = 0."""
    theta, theta_ref = logits
    expected = grad(lambda t: categorical_kl(log_softmax(t), log_softmax(theta_ref)), theta)
    assert_close(categorical_expected_gradient(theta, theta_ref, "k2"), expected, rtol=1e-9, atol=1e-12)


@given(categoricals)
def test_one_token_k3_in_the_loss_has_the_gradient_of_the_reverse_kl(logits):
    """∇ k3 = ∇(ρ − 1 − log ρ) = (1 − ρ)·∇log π with ρ = π_ref/π, so E_π[∇ k3] = −Σ_y π_ref(y)·∇log π(y)
    = ∇ KL(π_ref‖π): GRPO's k3 in the loss follows the reverse KL, not the KL(π‖π_ref) it estimates."""
    theta, theta_ref = logits
    expected = grad(lambda t: categorical_kl(log_softmax(theta_ref), log_softmax(t)), theta)
    assert_close(categorical_expected_gradient(theta, theta_ref, "k3"), expected, rtol=1e-9, atol=1e-12)


@given(categoricals, st.floats(0.01, 2))
def test_one_token_minus_beta_k1_in_the_reward_ascends_minus_beta_times_the_forward_kl(logits, beta):
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
def test_summed_k2_in_the_loss_is_the_per_state_forward_kl_gradient_with_states_held_fixed(theta, theta_ref):
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
def test_summed_k3_in_the_loss_is_the_per_state_reverse_kl_gradient_with_states_held_fixed(theta, theta_ref):
    """E_y[∇ Σ_t k3(a_t|s_t)] = Σ_s d_π(s)·∇ KL(π_ref(·|s)‖π(·|s)) with d_π fixed."""
    expected = per_state_kl_gradient(theta, theta_ref, reverse=True)
    assert_close(expected_penalty_gradient(theta, theta_ref, "k3"), expected, rtol=1e-9, atol=1e-12)


def test_summed_k3_is_neither_sequence_kl_gradient_on_longer_responses():
    """∇ KL(π_ref(y)‖π(y)) = −Σ_y π_ref(y)·∇log π(y) = Σ_s d_ref(s)·∇ KL(π_ref(·|s)‖π(·|s)) weighs the states by
    π_ref's state distribution d_ref, summed k3 by π's: they differ by Σ_s (d_π − d_ref)(s)·∇ KL(π_ref(·|s)‖π(·|s)).
    The forward sequence KL is another divergence again: on a seeded θ summed k3 is more than 0.05 from both."""
    theta, theta_ref = seeded_table(0), seeded_table(1)
    k3 = expected_penalty_gradient(theta, theta_ref, "k3")
    reverse = sequence_kl_gradient(theta, theta_ref, reverse=True)
    d_ref = state_probs(theta_ref)
    assert_close(per_state_kl_gradient(theta, theta_ref, reverse=True, d=d_ref), reverse, rtol=1e-9, atol=1e-12)
    difference = per_state_kl_gradient(theta, theta_ref, reverse=True, d=state_probs(theta) - d_ref)
    assert_close(k3 - reverse, difference, rtol=1e-9, atol=1e-12)
    assert (k3 - reverse).abs().max() > 0.05 and (k3 - sequence_kl_gradient(theta, theta_ref)).abs().max() > 0.05


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


# ---- Group advantages ----
def expected_group_gradient(theta, rewards, G: int, baseline: str, scale: bool):
    """Prompt p's policy is softmax(θ[p]) over K one-token responses with rewards[p] [K]. The exact expectation,
    over every G-tuple of responses to every prompt, of the ascent step ∇ (1/(P·G))·Σ_p Σ_i A_{p,i}·log π(y_{p,i}|p):
    all K^G groups of a prompt go to group_advantages at once, one per row."""
    P, K = theta.shape
    groups = torch.cartesian_prod(*[torch.arange(K)] * G).view(-1, G)  # [K^G, G]
    pi = log_softmax(theta).exp()

    def surrogate(t):
        logp = log_softmax(t)
        total = 0.0
        for p in range(P):
            advantages = grpo.group_advantages(rewards[p][groups], baseline, scale)
            total = total + (pi[p][groups].prod(1, keepdim=True) * advantages * logp[p][groups]).sum()
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


def near_constant(G: int):
    """Groups spread over many orders of magnitude, within a few ulps of each other, or tiny (their squared
    deviations underflow)."""
    return st.one_of(reals(G, -1e6, 1e6), reals(G, 1, 1 + 1e-12), reals(G, -1e-300, 1e-300))


@given(st.integers(2, 8).flatmap(near_constant))
def test_scaled_advantages_are_finite_and_bounded_even_when_scores_differ_by_a_rounding_error(scores):
    """In exact arithmetic |r_i − mean r|/s ≤ (G − 1)/√G for the sample std s (one outlier attains it). Computed,
    they stay finite and within √(G − 1) (group-mean) or G/√(G − 1) (leave-one-out, G/(G − 1) times as large)
    for any finite scores, even 0 and 1e-300, whose squared deviations underflow (s computed from them is 0 and
    A = ±inf); and within (G − 1)/√G when the spread is well above rounding: more than 1e-6 of the largest |r_i|,
    which is not subnormal (5e-324 and 0 give 1 and 0: their mean rounds to one of them)."""
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


# Rounded to 1e-6: an advantage whose square underflows (5e-324² = 0) is 0 to the machine, and so is its RMS.
@given(st.integers(1, 6).flatmap(lambda P: reals(P * 4, -3, 3)).map(lambda a: a.round(decimals=6)))
def test_batch_scaling_divides_every_advantage_by_one_standard_deviation(advantages):
    """--scale-advantages batch: A / sqrt(mean A²) with one divisor for the whole batch (centred advantages: the
    RMS is their std), so each prompt keeps its weight relative to the others and E[step] stays along ∇J up to
    one positive factor; the result has RMS 1, and a batch of zeros stays zeros, not NaN."""
    scaled = grpo.scale_by_batch_std(advantages)
    ratio = scaled[advantages != 0] / advantages[advantages != 0]
    if len(ratio):
        assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)
        assert ratio[0] > 0
        assert_close(scaled.pow(2).mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert_close(grpo.scale_by_batch_std(torch.zeros_like(advantages)), torch.zeros_like(advantages), rtol=0, atol=0)


# ---- The script ----
SMALL = ["--num-prompts", "8", "--group-size", "2", "--num-minibatches", "2", "--ppo-epochs", "2"]
SMALL += ["--max-new-tokens", "4", "--total-episodes", "32", "--eval-every", "1000000"]


@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory):
    """A tiny float64 GPT-2 policy, loaded as the script loads one."""
    return grpo.load_policy(
        str(tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")), torch.device("cpu"), torch.float64
    )


def update_params(policy, minibatches, n_prompt, **flags):
    """The parameters of a copy of policy after one update_minibatch per minibatch."""
    agent = grpo.PolicyLogProbs(copy.deepcopy(policy))
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, fused=True)
    args = grpo.Args(temperature=1.0, max_new_tokens=4, **flags)
    for minibatch in minibatches:
        grpo.update_minibatch(agent.train(), optimizer, minibatch, n_prompt, args, beta=0.1)
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


@pytest.mark.parametrize("aggregation", MODES)
@pytest.mark.parametrize("kl", ["k1-reward", "k3-loss"])
def test_micro_batching_leaves_the_same_parameters(gpt2_64, aggregation, kl):
    """Two steps on minibatches of 8 responses of different lengths, accumulated over micro-batches of 1, 3 or 8:
    the same parameters to 1e-10 in float64, for every loss aggregation, with the KL in the reward or in the
    loss: each token's weight comes from the whole minibatch's counts, not from its micro-batch's."""
    policy, tok = gpt2_64
    torch.manual_seed(0)
    ids, attn, n_prompt, mask, _ = grpo.sample(policy, tok, [f"{i}+{2 * i}=" for i in range(16)], 4, 1.0, 16)
    with torch.no_grad():
        logp_old = grpo.token_logprobs(policy, ids, attn, n_prompt, 1.0)[0]
    assert len(set(mask.sum(1).tolist())) > 1  # responses of several lengths: the aggregations differ
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, logp_ref=logp_old + 0.1 * torch.randn(mask.shape),
                 advantages=torch.randn(16, dtype=torch.float64))  # fmt: skip
    minibatches = [{k: v[i : i + 8] for k, v in batch.items()} for i in (0, 8)]
    flags = dict(loss_aggregation=aggregation, kl_penalty=kl)
    whole = update_params(policy, minibatches, n_prompt, micro_batch_size=8, **flags)
    for size in (1, 3):
        assert_close(
            update_params(policy, minibatches, n_prompt, micro_batch_size=size, **flags), whole, rtol=0, atol=1e-10
        )
    assert (whole - update_params(policy, [], n_prompt)).abs().max() > 1e-4  # the steps did move the parameters


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


def test_the_first_minibatchs_ratio_is_one_before_the_first_step(tmp_path, dropout_checkpoint):
    """π_θ/π_old = 1 within 1e-6 in float32 before the first step of every iteration (the sampler's forward,
    mask, positions and temperature, no dropout), and the later steps do move it; the KL in the loss is logged."""
    flags = ["--temperature", "0.7", "--learning-rate", "1e-3", "--kl-coef", "0.1", "--kl-penalty", "k3-loss"]
    _, rows = run_script("grpo.py", "--model", str(dropout_checkpoint), *SMALL, *flags, out_dir=tmp_path)
    assert [r["episodes"] for r in rows] == [0, 16, 32]
    for row in rows[1:]:
        assert row["first_minibatch_ratio_error"] <= 1e-6 and row["ratio_max"] > 1 + 1e-4 and row["kl_loss"] >= 0


@pytest.mark.parametrize("kl_coef, loads", [("0", 1), ("0.1", 2)])
def test_a_reference_policy_is_loaded_only_when_beta_is_positive(tmp_path, monkeypatch, kl_coef, loads):
    calls, load = [], grpo.load_policy
    monkeypatch.setattr(grpo, "load_policy", lambda *a, **k: calls.append(a[0]) or load(*a, **k))
    rows = run_main(grpo, *SMALL, "--kl-coef", kl_coef, "--output-dir", str(tmp_path))
    assert len(calls) == loads and ("kl" in rows[0]) == (loads == 2)
    for row in rows:  # with the KL in the reward (the default), R = score − β·Σ_t k1 per response
        assert row["reward_mean"] == pytest.approx(row["score_mean"] - float(kl_coef) * row.get("kl", 0), abs=1e-6)


@pytest.mark.parametrize("kl", ["k1-reward", "k2-loss", "k3-loss"])
def test_the_kl_in_the_loss_moves_the_policy_where_no_advantage_does(gpt2_64, kl):
    """Every advantage 0 and π_ref ≠ π_old: with β·k2 or β·k3 in the loss the step moves the policy, and with
    the KL in the reward (already in the advantages, here 0) it does not."""
    policy, tok = gpt2_64
    torch.manual_seed(1)
    ids, attn, n_prompt, mask, _ = grpo.sample(policy, tok, [f"{i}+{5 * i}=" for i in range(8)], 4, 1.0, 8)
    with torch.no_grad():
        logp_old = grpo.token_logprobs(policy, ids, attn, n_prompt, 1.0)[0]
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, logp_ref=logp_old + torch.randn(mask.shape),
                 advantages=torch.zeros(8, dtype=torch.float64))  # fmt: skip
    moved = (update_params(policy, [batch], n_prompt, kl_penalty=kl) - update_params(policy, [], n_prompt)).abs().max()
    assert (moved > 1e-4) == (kl != "k1-reward")


def test_same_seed_gives_the_same_metrics_and_a_copy_alone_runs(tmp_path):
    """Row for row apart from `seconds`, the second run from a copy of grpo.py alone in another folder, with
    the paper's choices and the KL in the loss."""
    flags = [*SMALL, "--model", str(CHECKPOINT), "--baseline", "group-mean", "--scale-advantages", "group",
             "--loss-aggregation", "sequence", "--kl-coef", "0.05", "--kl-penalty", "k3-loss"]  # fmt: skip
    shutil.copy(ROOT / "grpo.py", tmp_path / "grpo.py")
    runs = [run_script(script, *flags, out_dir=tmp_path / str(i), cwd=tmp_path)[1]
            for i, script in enumerate(["grpo.py", tmp_path / "grpo.py"])]  # fmt: skip
    assert without_seconds(runs[0]) == without_seconds(runs[1]) and len(runs[0]) == 3


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
])  # fmt: skip
def test_bad_input_is_one_error_line_before_any_work(monkeypatch, capsys, tmp_path, flags, message):
    argv = ["grpo.py", *SMALL, *flags, "--output-dir", str(tmp_path / "run")]
    assert_one_error_line_before_any_work(exit_message(monkeypatch, grpo.main, argv), message, capsys, tmp_path / "run")
