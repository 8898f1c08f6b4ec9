"""actor_critic.py: the actor-critic mathematics, checked exactly on a policy small enough to
enumerate, and the script end to end.

The tabular policy of tests/tiny.py (tokens EOS, a, b; at most 3 of them) has 15 responses and 7
states, so every expectation under π is an exact sum. Its hidden state is a one-hot of the state, so
the script's own value head on it is a table, V_φ(s) = φ[s], and the script's own PolicyAndCritic,
token_rewards, actor_loss and critic_loss run on it unchanged, with gae.py, at γ = 1.
"""

import copy
import math
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import actor_critic as ac
from gae import gae
from tiny import (
    CHECKPOINT,
    EOS,
    ROOT,
    TabularPolicy,
    all_responses,
    assert_one_error_line_before_any_work,
    exit_message,
    prefixes,
    response_batch,
    run_script,
    tiny_model,
    without_seconds,
)

RESPONSES, PREFIXES, ACTIONS = all_responses(), prefixes(), (EOS, 1, 2)
GAMMA = 1.0


def floats_of(*shape, lo=-2.0, hi=2.0):
    n = torch.Size(shape).numel()
    return st.lists(st.floats(lo, hi), min_size=n, max_size=n).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).view(*shape)
    )


lambdas = st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1))
critic_errors = st.tuples(
    floats_of(len(PREFIXES), lo=0.5, hi=2),
    st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(PREFIXES), max_size=len(PREFIXES)),
).map(lambda t: t[0] * torch.tensor(t[1], dtype=torch.float64))  # |error| >= 0.5


@st.composite
def tasks(draw):
    """π_θ, π_ref, a score R(y) for every response, and β (0 half the time)."""
    return (
        TabularPolicy(draw(floats_of(len(PREFIXES), 3))),
        TabularPolicy(draw(floats_of(len(PREFIXES), 3))),
        draw(floats_of(len(RESPONSES), lo=-5, hi=5)),
        draw(st.one_of(st.just(0.0), st.floats(0, 2))),
    )


def exact_values(policy: TabularPolicy, ref: TabularPolicy, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """V^π for the rewards r(s, a) = −β·log(π/π_ref)(a | s) (+ R(y) once y ends), by the Bellman
    recursion V(s) = Σ_a π(a|s)·[r(s, a) + V(s·a)] from the longest states back, V = 0 after the end.
    Written from θ directly: no code of the script's."""
    logp, logp_ref = policy.theta.detach().log_softmax(-1), ref.theta.detach().log_softmax(-1)
    score = dict(zip(RESPONSES, scores.tolist()))
    values = torch.zeros(len(PREFIXES), dtype=torch.float64)
    for s in sorted(PREFIXES, key=len, reverse=True):
        i = policy.index[s]
        for a in ACTIONS:
            y = s + (a,)
            after = score[y] if y in score else values[policy.index[y]]
            values[i] += logp[i, a].exp() * (-beta * (logp[i, a] - logp_ref[i, a]) + after)
    return values


def objective(policy: TabularPolicy, ref: TabularPolicy, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """J(θ) = Σ_y π_θ(y)·[R(y) − β·log(π_θ(y)/π_ref(y))], differentiable in θ through TabularPolicy.prob."""
    return sum(
        policy.prob(y) * (r - beta * (policy.prob(y).log() - ref.prob(y).log())) for y, r in zip(RESPONSES, scores)
    )


def run_pieces(policy, ref, scores, beta, critic: torch.Tensor, lam: float):
    """The script's own steps on every response: PolicyAndCritic with a tabular value head set to `critic`,
    token rewards, GAE. Returns the head too, whose parameters are φ."""
    ids, attn, prompt_width, mask = response_batch(RESPONSES)
    head = torch.nn.Linear(len(PREFIXES), 1).double()
    with torch.no_grad():
        head.weight.copy_(critic[None]), head.bias.zero_()
    logp, _, values = ac.PolicyAndCritic(policy, head)(ids, attn, prompt_width, 1.0)
    logp_ref = ac.token_logprobs(ref, ids, attn, prompt_width, 1.0)[0]
    rewards = ac.token_rewards(scores, mask, logp.detach() - logp_ref, beta)
    advantages, returns = gae(rewards, values, mask, GAMMA, lam)
    return dict(logp=logp, values=values, rewards=rewards, advantages=advantages, returns=returns, mask=mask, head=head)


def response_probs(policy: TabularPolicy) -> torch.Tensor:
    return torch.stack([policy.prob(y) for y in RESPONSES]).detach()


def expected_actor_gradient(policy, ref, scores, beta, critic, lam) -> torch.Tensor:
    """Exact E_y~π[−∇ actor_loss(y)]: the loss is a mean over responses, so weighting response y's
    advantages by N·π(y) turns that mean into the expectation over every response."""
    p = run_pieces(policy, ref, scores, beta, critic, lam)
    weights = len(RESPONSES) * response_probs(policy)[:, None]
    (grad,) = torch.autograd.grad(ac.actor_loss(p["logp"], weights * p["advantages"], p["mask"]), policy.theta)
    return -grad


def grad_objective(policy, ref, scores, beta) -> torch.Tensor:
    (grad,) = torch.autograd.grad(objective(policy, ref, scores, beta), policy.theta)
    return grad


def state_of(y: tuple, t: int) -> int:
    return PREFIXES.index(y[:t])


# ---- The critic V^π ----
@given(tasks())
def test_exact_critic_has_zero_bellman_residual_at_every_prefix(task):
    """V^π(s) = Σ_a π(a|s)·[r_t + V^π(s·a)] at every state s, with π, r_t and V read back through
    the script's PolicyAndCritic (its value head holding V^π) and token_rewards: values sit on the states,
    log-probs on the actions and rewards on the (state, action) pairs they belong to."""
    policy, ref, scores, beta = task
    p = run_pieces(policy, ref, scores, beta, exact_values(policy, ref, scores, beta), lam=1.0)
    values = p["values"].detach()
    backup = torch.zeros(len(PREFIXES), dtype=torch.float64)  # Σ_a π(a|s)·[r + V(s·a)]
    seen = set()
    for i, y in enumerate(RESPONSES):
        for t, a in enumerate(y):
            s = state_of(y, t)
            if (s, a) not in seen:  # each (s, a) is on many responses: count it once
                seen.add((s, a))
                after = values[i, t + 1] if t + 1 < len(y) else 0.0
                backup[s] += p["logp"][i, t].detach().exp() * (p["rewards"][i, t] + after)
    assert len(seen) == len(PREFIXES) * len(ACTIONS)
    residual = torch.stack(
        [values[i, t] - backup[state_of(y, t)] for i, y in enumerate(RESPONSES) for t in range(len(y))]
    )
    assert torch.allclose(residual, torch.zeros_like(residual), atol=1e-10)  # on every response through s


@given(tasks())
def test_td_error_under_the_exact_critic_has_zero_mean_under_pi_at_every_prefix(task):
    """E_π[δ_t | s_t = s] = 0 for every s, with δ_t = r_t + V(s_{t+1}) − V(s_t) the GAE advantage at
    λ = 0, weighted by π(y) over every response through s."""
    policy, ref, scores, beta = task
    p = run_pieces(policy, ref, scores, beta, exact_values(policy, ref, scores, beta), lam=0.0)
    probs, delta = response_probs(policy), p["advantages"].detach()
    mean = torch.zeros(len(PREFIXES), dtype=torch.float64)
    for i, y in enumerate(RESPONSES):
        for t in range(len(y)):
            mean[state_of(y, t)] += probs[i] * delta[i, t]
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-10)


# ---- The actor's expected gradient ----
@given(tasks(), lambdas)
def test_with_the_exact_critic_the_expected_actor_gradient_is_grad_j_for_every_lambda(task, lam):
    """E_π[Σ_t A_t·∇ log π_θ(a_t|s_t)] = ∇J(θ), with A from GAE(γ = 1, λ) on V^π, for any λ in [0, 1]
    (and β > 0: the KL term's own θ-dependence has zero expected score)."""
    policy, ref, scores, beta = task
    exact = exact_values(policy, ref, scores, beta)
    grad = expected_actor_gradient(policy, ref, scores, beta, exact, lam)
    assert torch.allclose(grad, grad_objective(policy, ref, scores, beta), atol=1e-9)


@given(tasks(), critic_errors, st.floats(0, 0.9))
def test_with_a_wrong_critic_the_expected_actor_gradient_is_grad_j_only_for_lambda_1(task, error, lam):
    """A wrong V is only a baseline at λ = 1 (A_t = return − V(s_t)): unbiased. At λ < 1 its errors
    leak into A_t through V(s_{t+1}) and bias the gradient."""
    policy, ref, scores, beta = task
    wrong = exact_values(policy, ref, scores, beta) + error
    true = grad_objective(policy, ref, scores, beta)
    assert torch.allclose(expected_actor_gradient(policy, ref, scores, beta, wrong, 1.0), true, atol=1e-9)
    assert not torch.allclose(expected_actor_gradient(policy, ref, scores, beta, wrong, lam), true, atol=1e-6)


# ---- Which loss trains what ----
@given(tasks(), floats_of(len(PREFIXES)), st.floats(0, 0.9))
def test_actor_loss_has_no_gradient_wrt_the_critic_and_the_critics_target_is_fixed(task, critic, lam):
    """∇_φ actor_loss = 0 although A_t is built from V_φ; ∇_φ critic_loss = ∇_φ ½Σ_t (V_φ(s_t) − R_t)²
    with R_t a constant, although R_t = A_t + V_φ(s_t) is built from V_φ too (λ < 1)."""
    p = run_pieces(*task, critic, lam)
    phi = list(p["head"].parameters())
    for g in torch.autograd.grad(ac.actor_loss(p["logp"], p["advantages"], p["mask"]), phi, allow_unused=True):
        assert g is None or not g.any()
    semi = torch.autograd.grad(ac.critic_loss(p["values"], p["returns"], p["mask"]), phi, retain_graph=True)
    fixed = torch.autograd.grad(ac.critic_loss(p["values"], p["returns"].detach(), p["mask"]), phi)
    assert all(torch.equal(a, b) for a, b in zip(semi, fixed))
    assert p["returns"].requires_grad  # the check above was not vacuous


# ---- Token rewards ----
@given(
    st.lists(st.sampled_from(RESPONSES), min_size=1, max_size=6).flatmap(
        lambda ys: st.tuples(
            st.just(ys), floats_of(len(ys), lo=-5, hi=5), floats_of(len(ys), max(map(len, ys))), st.floats(0, 2)
        )
    )
)
def test_score_lands_on_eos_or_on_the_last_token_when_cut_off_and_the_kl_penalty_on_every_token(batch):
    """r_t = −β·kl_t on every valid token, plus R(y) at y's EOS (its last token when cut off), 0 on padding."""
    ys, scores, kl, beta = batch
    _, _, _, mask = response_batch(ys)
    rewards = ac.token_rewards(scores, mask, kl, beta)
    for i, y in enumerate(ys):
        end = y.index(EOS) if EOS in y else len(y) - 1
        for t in range(mask.shape[1]):
            expected = (-beta * kl[i, t] if t < len(y) else 0.0) + (scores[i] if t == end else 0.0)
            assert torch.isclose(rewards[i, t], torch.as_tensor(expected, dtype=torch.float64), atol=1e-12)


# ---- Explained variance ----
@given(
    st.integers(1, 5).flatmap(
        lambda b: st.tuples(
            floats_of(b, 4),
            floats_of(b, 4),
            floats_of(b, 4, lo=-1e3, hi=1e3),
            st.lists(st.integers(1, 4), min_size=b, max_size=b),
        )
    )
)
def test_explained_variance_is_over_valid_tokens_only(batch):
    """1 − Var[R − V]/Var[R] over valid tokens (None if every R is equal); junk at padding changes nothing;
    1 for V = R, 0 for V = mean R."""
    values, returns, junk, lengths = batch
    mask = torch.arange(4) < torch.tensor(lengths)[:, None]
    r, v = returns[mask], values[mask]
    var = r.var(correction=0)
    padded = lambda x: torch.where(mask, x, junk)
    explained = ac.explained_variance(padded(values), padded(returns), mask)
    assert (explained is None) == (var == 0) or var < 1e-12  # below that, the two variances round apart
    if var > 1e-6:
        assert explained.item() == pytest.approx((1 - (r - v).var(correction=0) / var).item(), abs=1e-9)
        assert ac.explained_variance(padded(returns), padded(returns), mask).item() == pytest.approx(1.0)
        mean = torch.full_like(returns, r.mean())
        assert ac.explained_variance(padded(mean), padded(returns), mask).item() == pytest.approx(0.0, abs=1e-9)


# ---- Micro-batches ----
def test_micro_batching_leaves_the_same_parameters(tmp_path):
    """One update on 16 responses (GAE, both losses, a KL penalty to π_ref), accumulated over micro-batches
    of 1, 5 or 16: the same parameters to 1e-10 in float64, policy, value head and separate critic alike.
    Each micro-batch's loss is a mean over its responses weighted by its share of them."""
    path, cpu = str(tiny_model(tmp_path, "gpt2")), torch.device("cpu")
    policy, tok = ac.load_policy(path, cpu, torch.float64)
    ref = ac.load_policy(path, cpu, torch.float64)[0]
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))  # so that the KL penalty is not 0
    torch.manual_seed(0)
    ids, attn, prompt_width, mask, _ = ac.sample(policy, tok, [f"{i}+{3 * i}=" for i in range(16)], 4, 1.0, 16)
    batch = dict(ids=ids, attn=attn, mask=mask, scores=torch.randn(16, dtype=torch.float64))

    def parameters_after_update(micro_batch_size: int) -> torch.Tensor:
        head = torch.nn.Linear(policy.config.hidden_size, 1).double()
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
        model = ac.PolicyAndCritic(copy.deepcopy(policy), head, copy.deepcopy(policy.base_model))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        args = ac.Args(micro_batch_size=micro_batch_size, kl_coef=0.5)
        for _ in range(2):
            ac.update(model.train(), optimizer, ref, batch, prompt_width, args)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    whole = parameters_after_update(16)
    for size in (1, 5):
        torch.testing.assert_close(parameters_after_update(size), whole, rtol=0, atol=1e-10)
    start = torch.cat([p.flatten() for p in (*policy.parameters(), *policy.base_model.parameters())])
    assert (whole[: len(start)] - start).abs().max() > 1e-4  # the updates did move the parameters


# ---- End to end ----
@pytest.mark.slow
def test_default_run_improves_eval_accuracy_on_a_fixed_budget(tmp_path):
    _, rows = run_script("actor_critic.py", "--total-episodes", "2560", out_dir=tmp_path)
    first, last = rows[0], rows[-1]
    assert first["episodes"] == 0 and last["episodes"] == 2560
    assert last["eval_accuracy"] >= first["eval_accuracy"] + 0.1  # 0.376 -> 0.580 here
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "args.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch, flags", [
    ("llama", ("--kl-coef", "0.1", "--micro-batch-size", "8")),  # no pad token; a reference model
    ("neox", ("--critic", "separate")),
])  # fmt: skip
def test_runs_on_other_causal_lms(tmp_path, arch, flags):
    """A smoke test of other architectures: every row is there and finite."""
    model = tiny_model(tmp_path / arch, arch, pad_token=arch != "llama")
    flags = ("--model", str(model), "--total-episodes", "32", "--num-prompts", "16", "--max-new-tokens", "3", *flags)
    _, rows = run_script("actor_critic.py", *flags, out_dir=tmp_path / "run")
    assert [r["episodes"] for r in rows] == [0, 16, 32]
    assert all(v is None or math.isfinite(v) for r in rows for v in r.values())


@pytest.mark.slow
def test_a_copy_alone_with_gae_py_reproduces_the_original_row_for_row(tmp_path):
    """Same seed and flags: a copy in an empty folder writes the original's metrics, apart from seconds."""
    for name in ("actor_critic.py", "gae.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    flags = ("--model", str(CHECKPOINT), "--total-episodes", "64", "--num-prompts", "32", "--micro-batch-size", "16",
             "--kl-coef", "0.1", "--critic", "separate")  # fmt: skip
    runs = [
        run_script(script, *flags, out_dir=tmp_path / name, cwd=tmp_path)[1]
        for name, script in (("original", ROOT / "actor_critic.py"), ("copy", tmp_path / "actor_critic.py"))
    ]
    assert without_seconds(runs[0]) == without_seconds(runs[1]) and [r["episodes"] for r in runs[0]] == [0, 32, 64]
    assert runs[0][-1]["kl"] != 0  # the reference model was in the loop


@pytest.mark.parametrize("flags, message", [
    (["--gae-lambda", "1.5"], "--gae-lambda"),
    (["--gamma", "-0.1"], "--gamma"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--critic", "tied"], "critic"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--no-such-flag", "1"], "no-such-flag"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])  # fmt: skip
def test_bad_input_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys, flags, message):
    argv = ["actor_critic.py", "--total-episodes", "1", *flags, "--output-dir", str(tmp_path / "run")]
    assert_one_error_line_before_any_work(exit_message(monkeypatch, ac.main, argv), message, capsys, tmp_path / "run")
