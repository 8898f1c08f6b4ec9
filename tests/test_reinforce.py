"""reinforce.py: the score-function mathematics, checked exactly on policies small enough to
enumerate, and the script end to end."""

import itertools
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

import reinforce as R
from tiny import (
    TabularPolicy,
    all_responses,
    assert_one_error_line_before_any_work,
    exit_message,
    prefixes,
    response_batch,
    run_script,
)

RESPONSES = all_responses()
N_PREFIXES = len(prefixes())


def logits_table(rows: int, cols: int):
    return st.lists(st.floats(-3, 3), min_size=rows * cols, max_size=rows * cols).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).view(rows, cols)
    )


def rewards_of(n: int):
    return st.lists(st.floats(-5, 5), min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))


def sequence_logprobs(policy: TabularPolicy) -> torch.Tensor:
    """log π_θ(y) of every response, through the script's own token_logprobs."""
    ids, attn, prompt_width, mask = response_batch(RESPONSES)
    logp, _ = R.token_logprobs(policy, ids, attn, prompt_width, temperature=1.0)
    return torch.where(mask, logp, 0.0).sum(1)


def expected_surrogate_gradient(policy: TabularPolicy, advantages: torch.Tensor) -> torch.Tensor:
    """Exact E_y~π[∇ loss(y)]: the script's loss is a batch mean, so weighting response y by N·π(y)
    turns that mean into the expectation over every response."""
    policy.zero_grad()
    ids, attn, prompt_width, mask = response_batch(RESPONSES)
    logp, _ = R.token_logprobs(policy, ids, attn, prompt_width, temperature=1.0)
    weights = len(RESPONSES) * sequence_logprobs(policy).exp().detach()
    R.reinforce_loss(logp, mask, weights * advantages).backward()
    return policy.theta.grad.clone()


def finite_difference_gradient(theta: torch.Tensor, rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """∇J(θ) for J = Σ_y π_θ(y)·R(y), by central differences: no autograd, no score function."""

    def J(t):
        policy = TabularPolicy(t)
        return sum(policy.prob(y) * r for y, r in zip(RESPONSES, rewards)).item()

    grad = torch.zeros_like(theta)
    for i in itertools.product(*map(range, theta.shape)):
        step = torch.zeros_like(theta)
        step[i] = eps
        grad[i] = (J(theta + step) - J(theta - step)) / (2 * eps)
    return grad


# ---- The score function ----
@given(logits_table(N_PREFIXES, 3))
def test_score_function_has_zero_mean(theta):
    """Σ_y π(y)·∇ log π(y) = ∇ Σ_y π(y) = ∇1 = 0."""
    policy = TabularPolicy(theta)
    logp = sequence_logprobs(policy)
    (grad,) = torch.autograd.grad((logp.exp().detach() * logp).sum(), policy.theta)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)


@given(logits_table(N_PREFIXES, 3), rewards_of(len(RESPONSES)))
def test_expected_surrogate_gradient_is_minus_grad_of_expected_reward(theta, rewards):
    """E_y[∇ −R(y)·log π(y)] = −∇J(θ), with ∇J taken by finite differences of the exact J."""
    grad = expected_surrogate_gradient(TabularPolicy(theta), rewards)
    assert torch.allclose(grad, -finite_difference_gradient(theta, rewards), atol=1e-6)


# ---- Baselines ----
def categorical_expected_gradient(theta, rewards, baseline):
    """Exact expected gradient of the script's loss for a one-step policy π(y | x) = softmax(θ[x])_y
    with prompts x uniform: every (x, y) is one 'response' of length 1."""
    theta = theta.clone().requires_grad_(True)
    logp = theta.log_softmax(-1)  # [X, Y]
    n_x, n_y = theta.shape
    weights = (logp.exp() / n_x).detach().flatten() * (n_x * n_y)  # turns the batch mean into E_{x,y}
    advantages = weights * (rewards - baseline).flatten()
    loss = R.reinforce_loss(logp.flatten()[:, None], torch.ones(n_x * n_y, 1, dtype=torch.bool), advantages)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


@given(logits_table(3, 4), logits_table(3, 4), rewards_of(3), st.floats(-5, 5))
def test_baselines_that_ignore_the_response_leave_the_expected_gradient_unchanged(theta, rewards, b_x, c):
    """b = c and b = b(x) give the gradient of b = 0; b = b(y), which sees the response, does not."""
    expected = categorical_expected_gradient(theta, rewards, torch.zeros(3, 4))
    for baseline in (torch.full((3, 4), c), b_x[:, None].expand(3, 4)):
        assert torch.allclose(categorical_expected_gradient(theta, rewards, baseline), expected, atol=1e-10)


def test_a_baseline_that_sees_the_response_biases_the_gradient():
    """Negative control: b(x, y) = R(x, y) zeroes every advantage, so the expected gradient is gone."""
    theta = torch.tensor([[0.3, -1.0, 0.5, 0.0]] * 3, dtype=torch.float64)
    rewards = torch.arange(12.0, dtype=torch.float64).view(3, 4)
    expected = categorical_expected_gradient(theta, rewards, torch.zeros(3, 4))
    biased = categorical_expected_gradient(theta, rewards, rewards)
    assert expected.abs().max() > 0.1 and not torch.allclose(biased, expected, atol=1e-3)


@given(st.integers(2, 6).flatmap(lambda k: st.lists(rewards_of(k), min_size=1, max_size=4)))
def test_leave_one_out_advantages_sum_to_zero_and_rescale_the_mean_baseline(groups):
    """A_i = R_i − mean_{j≠i} R_j sums to 0 in a group and equals k/(k−1)·(R_i − mean R)."""
    scores = torch.stack(groups)
    k = scores.shape[1]
    advantages = scores - R.leave_one_out(scores)
    assert advantages.sum(1).abs().max() < 1e-9
    assert torch.allclose(advantages, k / (k - 1) * (scores - scores.mean(1, keepdim=True)), atol=1e-9)


def batch_gradients(theta: torch.Tensor, rewards: torch.Tensor, k: int, baseline: str):
    """Every K-tuple of samples from π = softmax(θ) over len(θ) responses: its probability and the
    gradient the script computes from it, with or without the leave-one-out baseline."""
    out = []
    for ys in itertools.product(range(len(theta)), repeat=k):
        t = theta.clone().requires_grad_(True)
        logp = t.log_softmax(-1)
        ys = torch.tensor(ys)
        r = rewards[ys]
        advantages = r - R.leave_one_out(r[None]).flatten() if baseline == "leave-one-out" else r
        loss = R.reinforce_loss(logp[ys][:, None], torch.ones(k, 1, dtype=torch.bool), advantages)
        (grad,) = torch.autograd.grad(loss, t)
        out.append((logp.exp()[ys].prod().item(), grad))
    return out


def gradient_variance(theta, rewards, k, baseline):
    """Exact E||g − E g||² of the batch gradient g, over every K-tuple of samples."""
    batches = batch_gradients(theta, rewards, k, baseline)
    mean = sum(p * g for p, g in batches)
    return sum(p * (g - mean).pow(2).sum() for p, g in batches).item(), mean


@given(logits_table(1, 3).map(lambda t: t[0]), rewards_of(3), st.integers(2, 3))
def test_leave_one_out_is_exactly_unbiased(theta, rewards, k):
    """E over every K-tuple of the RLOO batch gradient = the no-baseline one = −∇J."""
    _, unbiased = gradient_variance(theta, rewards, k, "none")
    _, rloo = gradient_variance(theta, rewards, k, "leave-one-out")
    t = theta.clone().requires_grad_(True)
    (grad_j,) = torch.autograd.grad((t.softmax(-1) * rewards).sum(), t)
    assert torch.allclose(unbiased, -grad_j, atol=1e-10) and torch.allclose(rloo, -grad_j, atol=1e-10)


def test_leave_one_out_lowers_the_variance_on_the_seed_example():
    """Two responses scored 8 and 2, all rewards positive: no baseline pushes both up, noisily."""
    theta, rewards = torch.zeros(2, dtype=torch.float64), torch.tensor([8.0, 2.0], dtype=torch.float64)
    none, _ = gradient_variance(theta, rewards, 2, "none")
    rloo, _ = gradient_variance(theta, rewards, 2, "leave-one-out")
    assert rloo < none


@given(logits_table(1, 3).map(lambda t: t[0]), rewards_of(3), st.floats(20, 100))
def test_leave_one_out_lowers_the_variance_when_rewards_share_a_large_offset(theta, spread, offset):
    """R = offset + small spread: the offset adds variance without baseline, and none with RLOO."""
    rewards = offset + spread / 10
    none, _ = gradient_variance(theta, rewards, 2, "none")
    rloo, _ = gradient_variance(theta, rewards, 2, "leave-one-out")
    assert rloo < none


# ---- Per-token log-probs on a real transformer ----
@pytest.fixture(scope="module")
def gpt2():
    """A tiny float64 GPT-2: learned absolute position embeddings, so positions must be right."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=8, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(config).double().eval()
    model.token_id_limit = config.vocab_size  # as load_policy sets it: every id is the tokenizer's
    return model


tokens = st.integers(2, 7)  # 0 is padding, 1 is EOS


@given(
    prompt=st.lists(tokens, min_size=1, max_size=4),
    response=st.lists(tokens, min_size=0, max_size=3),
    pad=st.integers(1, 4),
    after=st.lists(st.integers(0, 7), min_size=2, max_size=2),
)
def test_token_logprobs_are_a_log_softmax_gather_unchanged_by_left_padding_and_what_follows_eos(
    gpt2, prompt, response, pad, after
):
    """The response's log-probs in a left-padded batch, with junk after EOS, equal log_softmax
    gathered from the unpadded sequence alone."""
    response = response + [1]
    alone = torch.tensor([prompt + response])
    logits = gpt2(input_ids=alone).logits[0, len(prompt) - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)

    ids = torch.tensor([[0] * pad + prompt + response + after])
    attn = torch.tensor([[0] * pad + [1] * (len(prompt) + len(response)) + [0] * len(after)])
    logp, _ = R.token_logprobs(gpt2, ids, attn, pad + len(prompt), temperature=1.0)
    assert torch.allclose(logp[0, : len(response)], expected, atol=1e-12, rtol=0)


def test_token_logprobs_divide_the_logits_by_the_sampling_temperature(gpt2):
    ids, attn = torch.tensor([[3, 4, 5, 1]]), torch.ones(1, 4, dtype=torch.long)
    logp, _ = R.token_logprobs(gpt2, ids, attn, 2, temperature=0.5)
    expected = (gpt2(input_ids=ids).logits[0, 1:-1] / 0.5).log_softmax(-1).gather(-1, ids[0, 2:, None]).squeeze(-1)
    assert torch.allclose(logp[0], expected, atol=1e-12)


# ---- End to end ----
@pytest.mark.slow
def test_default_run_improves_eval_accuracy_on_a_fixed_budget(tmp_path):
    _, rows = run_script("reinforce.py", "--total-episodes", "5120", "--eval-every", "5120", out_dir=tmp_path)
    first, last = rows[0], rows[-1]
    assert first["episodes"] == 0 and last["episodes"] == 5120
    assert last["eval_accuracy"] >= first["eval_accuracy"] + 0.05
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "args.json").exists()


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(tmp_path):
    flags = (
        "--total-episodes",
        "512",
        "--eval-every",
        "256",
        "--num-prompts",
        "32",
        "--baseline",
        "mean",
        "--kl-coef",
        "0.1",
    )
    runs = [run_script("reinforce.py", *flags, out_dir=tmp_path / str(i))[1] for i in range(2)]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(runs[0]) == strip(runs[1]) and len(runs[0]) == 5
    assert all(r["kl"] >= 0 for r in runs[0][1:]) and any(r["kl"] > 0 for r in runs[0][1:])


@pytest.mark.slow
def test_runs_copied_alone_on_a_llama_whose_tokenizer_has_no_pad_token(tmp_path):
    from tiny import tiny_model

    model = tiny_model(tmp_path / "llama", "llama", pad_token=False)
    shutil.copy(R.__file__, tmp_path / "reinforce.py")
    _, rows = run_script(
        tmp_path / "reinforce.py",
        "--model",
        str(model),
        "--total-episodes",
        "64",
        "--num-prompts",
        "16",
        "--eval-every",
        "64",
        "--baseline",
        "none",
        out_dir=tmp_path / "run",
        cwd=tmp_path,
    )
    assert [r["episodes"] for r in rows] == [0, 64] and "eval_accuracy" in rows[-1]


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--baseline", "leave-one-out", "--samples-per-prompt", "1"], "leave-one-out"),
    (["--baseline", "median"], "baseline"),
    (["--no-such-flag", "1"], "no-such-flag"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--temperature", "0"], "--temperature"),
])  # fmt: skip
def test_bad_input_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys, flags, message):
    argv = ["reinforce.py", "--total-episodes", "1", *flags, "--output-dir", str(tmp_path / "run")]
    assert_one_error_line_before_any_work(exit_message(monkeypatch, R.main, argv), message, capsys, tmp_path / "run")


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_stderr_line_and_a_nonzero_exit(tmp_path):
    proc, _ = run_script("reinforce.py", "--temperature", "0", out_dir=tmp_path / "run", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == ["error: --temperature must be > 0"]
    assert not (tmp_path / "run").exists()
