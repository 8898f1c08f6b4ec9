"""ppo.py: the clipped surrogate, value clipping, KL estimators, token rewards, whitening and the
adaptive KL controller checked as properties; then the script end to end. Each test's name or
docstring states the invariant it checks."""

import copy
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
from tiny import (
    CHECKPOINT,
    ROOT,
    TabularPolicy,
    all_responses,
    assert_one_error_line_before_any_work,
    error_line,
    exit_message,
    prefixes,
    response_batch,
    run_main,
    run_script,
    score_alone,
    tiny_model,
    without_seconds,
)

RESPONSES = all_responses()
finite = st.floats(-5, 5)
clip_ranges = st.floats(0.05, 0.5)


def tensors(n: int, elements=finite):
    return st.lists(elements, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))


@st.composite
def padded(draw):
    """(x, mask) [B, T] float64 with right-padded rows of 1..T valid tokens and NaN padding."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    mask = torch.arange(T) < lengths[:, None]
    return torch.where(mask, draw(tensors(B * T)).view(B, T), math.nan), mask


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
def test_clipped_objective_is_min_r_1_plus_eps_for_a_good_action_and_max_r_1_minus_eps_for_a_bad_one(batch, eps):
    """By cases, −loss = min(r, 1 + ε)·A where A > 0 and max(r, 1 − ε)·A where A < 0: the objective stops
    rising once r passes the clip in the direction A favours, and never exceeds the unclipped r·A."""
    log_r, advantages = batch
    loss, ratio = ppo.policy_loss(log_r, torch.zeros_like(log_r), advantages, eps)
    by_cases = torch.where(advantages > 0, ratio.clamp(max=1 + eps), ratio.clamp(min=1 - eps)) * advantages
    assert_close(-loss, by_cases, rtol=1e-12, atol=1e-12)
    assert (-loss <= ratio * advantages).all()


@given(tensors(len(prefixes()) * 3), tensors(len(RESPONSES) * 3), st.floats(0.5, 2), clip_ranges)
def test_at_ratio_one_the_ppo_gradient_is_the_vanilla_policy_gradient(theta, advantages, temperature, eps):
    """With π_θ = π_old (the first minibatch), ∇ of the PPO loss = ∇ of −A·log π_θ, token by token
    through the script's forward pass on an enumerable policy."""
    policy = TabularPolicy(theta.view(-1, 3))
    ids, attn, prompt_width, mask = response_batch(RESPONSES)
    advantages = advantages.view(len(RESPONSES), 3)
    logp, _ = ppo.token_logprobs(policy, ids, attn, prompt_width, temperature)
    ppo_loss, ratio = ppo.policy_loss(logp, logp.detach(), advantages, eps)
    (ppo_grad,) = torch.autograd.grad(ppo.masked_mean(ppo_loss, mask), policy.theta, retain_graph=True)
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
    for k in ("k1", "k3"):
        assert_close((logp.exp() * ppo.kl_penalty(logp, logp_ref, k)).sum(), kl, rtol=1e-9, atol=1e-12)


@given(tensors(16, st.floats(-30, 30)), tensors(16, st.floats(-30, 30)))
def test_k3_is_never_negative(logp, logp_ref):
    assert (ppo.kl_penalty(logp, logp_ref, "k3") >= 0).all()


# ---- Token rewards and advantages ----
@given(padded(), st.data(), st.floats(0, 2))
def test_monte_carlo_advantage_is_score_minus_beta_times_kl_to_go(batch, data, beta):
    """γ = λ = 1, V = 0: A_t = score − β·Σ_{t' ≥ t} kl_{t'}, kl = log π_old − log π_ref; the reward at
    the last valid token (EOS) is score − β·kl there, and 0 on padding. Padding holds NaN."""
    logp_old, mask = batch
    logp_ref = torch.where(mask, data.draw(tensors(mask.numel())).view(mask.shape), math.nan)
    scores = data.draw(tensors(len(mask)))
    rewards = ppo.token_rewards(scores, mask, ppo.kl_penalty(logp_old, logp_ref, "k1"), beta)
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
    if valid.var(unbiased=False) > 0.1:
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


# ---- The reward model ----
def tiny_reward_model(path, pad_token: bool):
    """A random 2-layer GPT-2 sequence classifier with one label and the embedded tokenizer."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    if not pad_token:
        tok.pad_token = None
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=1,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("pad_token", [True, False], ids=["pad", "no-pad: EOS pads"])
def test_reward_model_scores_the_last_token_whatever_the_padding(tmp_path, pad_token):
    """In a batch of sampled sequences of different lengths, left-padded prompts and right-padded responses,
    some ending on EOS, each scores as it does alone: read at its own last token, not at padding, even where
    the pad token is EOS."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    model = ppo.load_reward_model(str(tiny_reward_model(tmp_path, pad_token)), torch.device("cpu"), torch.float32, tok)
    prompts, responses = ["1+2=", "12+34=", "9+9=", "99+99=", "5+5="], ["3", "46<eos>", "", "198<eos>", "1<pad>0<eos>"]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    response_ids = [tok(r)["input_ids"] for r in responses]
    width_p, width_r = max(map(len, prompt_ids)), max(map(len, response_ids))
    ids = torch.tensor(
        [[0] * (width_p - len(p)) + p + r + [0] * (width_r - len(r)) for p, r in zip(prompt_ids, response_ids)]
    )
    attn = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r))
                         for p, r in zip(prompt_ids, response_ids)])  # fmt: skip
    batched = ppo.reward_model_scores(model, ids, attn, batch_size=3)
    alone = [score_alone(model, torch.tensor(p + r)) for p, r in zip(prompt_ids, response_ids)]
    assert_close(batched.double(), torch.tensor(alone, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert batched.unique().numel() == len(prompts)


# ---- Micro-batches, and the value each token's state gets ----
@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory):
    """A tiny float64 GPT-2 policy, loaded as the script loads one."""
    return ppo.load_policy(str(tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")), torch.device("cpu"), torch.float64)


def random_minibatch(policy, tok, n: int, seed: int = 0):
    """n sampled responses with random advantages, returns and old values: what update_minibatch takes."""
    torch.manual_seed(seed)
    ids, attn, prompt_width, mask, _ = ppo.sample(policy, tok, [f"{i}+{2 * i}=" for i in range(n)], 4, 1.0, n)
    with torch.no_grad():
        logp_old = ppo.token_logprobs(policy, ids, attn, prompt_width, 1.0)[0]
    noise = lambda: torch.randn(mask.shape, dtype=torch.float64)
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, values_old=noise(), advantages=noise())
    return batch | {"returns": noise()}, prompt_width


def update_params(policy, minibatches, prompt_width, **flags):
    """The parameters of a copy of policy + a fresh value head after one update_minibatch per minibatch."""
    head = torch.nn.Linear(policy.config.hidden_size, 1).double()
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    model = ppo.PolicyAndCritic(copy.deepcopy(policy), head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    args = ppo.Args(temperature=1.0, **flags)
    for minibatch in minibatches:
        ppo.update_minibatch(model.train(), optimizer, minibatch, prompt_width, args)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_micro_batching_leaves_the_same_parameters(gpt2_64):
    """Two steps of PPO on minibatches of 8 responses, accumulated over micro-batches of 1, 3 or 8:
    the same parameters to 1e-10 in float64. Each micro-batch adds its token sum divided by the
    minibatch's token count, so accumulation equals one pass over the minibatch."""
    policy, tok = gpt2_64
    batch, prompt_width = random_minibatch(policy, tok, 16)
    minibatches = [{k: v[i : i + 8] for k, v in batch.items()} for i in (0, 8)]
    whole = update_params(policy, minibatches, prompt_width, micro_batch_size=8)
    for size in (1, 3):
        assert_close(update_params(policy, minibatches, prompt_width, micro_batch_size=size), whole, rtol=0, atol=1e-10)
    assert (whole - update_params(policy, [], prompt_width)).abs().max() > 1e-4  # the steps did move the parameters


@given(tensors(len(prefixes())))
def test_values_are_read_at_the_state_before_each_token(table):
    """V(s_t) sits where the log-prob of a_t sits: with a one-hot hidden state, a linear value head is a
    table V[s], and PolicyAndCritic's value at response position t is V[y_<t], the state a_t was chosen in."""
    policy, (ids, attn, prompt_width, _) = TabularPolicy(), response_batch(RESPONSES)
    head = torch.nn.Linear(len(prefixes()), 1).double()
    with torch.no_grad():
        head.weight.copy_(table[None]), head.bias.zero_()
        values = ppo.PolicyAndCritic(policy, head)(ids, attn, prompt_width, 1.0)[2]
    for i, y in enumerate(RESPONSES):
        assert values[i, : len(y)].tolist() == [table[policy.index[y[:t]]].item() for t in range(len(y))]


# ---- End to end ----
SMALL = "--num-prompts 16 --num-minibatches 2 --ppo-epochs 2 --max-new-tokens 4 --total-episodes 32".split()
SMALL += ["--eval-every", "1000000"]


def training_rows(rows: list[dict], episodes: int = 32, batch: int = 16) -> list[dict]:
    """The rows after row 0, checked to be the complete, finite record of the run."""
    assert [r["episodes"] for r in rows] == list(range(0, episodes + 1, batch)) and "eval_accuracy" in rows[-1]
    # explained variance is undefined (None) when every return is equal, e.g. all scores 0 and π = π_ref
    assert all(k == "explained_variance" and v is None or math.isfinite(v) for r in rows for k, v in r.items())
    return rows[1:]


@pytest.fixture(scope="module")
def dropout_models(tmp_path_factory):
    """Tiny models whose configs switch dropout on, which the update's training mode would apply if
    load_policy did not switch it off."""
    return {arch: tiny_model(tmp_path_factory.mktemp(arch), arch, pad_token=arch == "gpt2", dropout=0.5)
            for arch in ("gpt2", "llama")}  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"], ids=["gpt2", "llama-without-pad-token"])
def test_first_minibatch_ratio_is_one_on_tiny_architectures(tmp_path, dropout_models, arch):
    """π_θ/π_old = 1 within 1e-6 in float32 before the first step of every iteration (same forward,
    mask, positions, temperature, no dropout), and the later steps do move it. A random model
    rarely emits EOS, so --missing-eos-penalty gives its responses different scores."""
    flags = "--temperature 0.7 --learning-rate 1e-3 --kl-coef 0.1 --missing-eos-penalty 1".split()
    rows = run_main(ppo, "--model", str(dropout_models[arch]), *SMALL, *flags, "--output-dir", str(tmp_path))
    for row in training_rows(rows):
        assert row["first_minibatch_ratio_error"] <= 1e-6 and row["ratio_max"] > 1 + 1e-4
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "args.json").exists()


@pytest.mark.slow
def test_the_reward_model_scores_each_response_as_it_scores_it_alone(tmp_path, monkeypatch):
    """Every batch the reward model scores in a run (the sampled ids: prompt and response up to and including
    its stop token) gets, sequence by sequence, the score the reward model gives those ids alone; the logged
    score_mean is their mean and gold_mean is the task's reward of the same responses."""
    rm = tiny_reward_model(tmp_path / "rm", pad_token=False)  # EOS pads: the case where reading by pad id fails
    scored, score = [], ppo.reward_model_scores
    monkeypatch.setattr(ppo, "reward_model_scores", lambda *a: scored.append((a[1], a[2], score(*a))) or scored[-1][2])
    rows = run_main(ppo, "--reward-model", str(rm), *SMALL, "--output-dir", str(tmp_path / "run"))
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    model = ppo.load_reward_model(str(rm), torch.device("cpu"), torch.float32, tok)
    assert len(scored) == len(rows) and any((ids == tok.eos_token_id).any() for ids, _, _ in scored)
    for (ids, attn, scores), row in zip(scored, rows):
        alone = torch.tensor(
            [score_alone(model, seq[keep.bool()]) for seq, keep in zip(ids, attn)], dtype=torch.float64
        )
        assert_close(scores.double(), alone, rtol=1e-5, atol=1e-6)
        assert row["score_mean"] == pytest.approx(scores.mean().item(), abs=1e-6)
        assert 0 <= row["gold_mean"] <= 1 and row["gold_mean"] * 16 % 1 == 0


@pytest.mark.slow
def test_runs_copied_alone_with_gae(tmp_path):
    for name in ("ppo.py", "gae.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    _, rows = run_script(
        tmp_path / "ppo.py", "--model", str(CHECKPOINT), *SMALL, out_dir=tmp_path / "run", cwd=tmp_path
    )
    training_rows(rows)


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(tmp_path):
    """Row for row apart from `seconds`, with a separate critic and an adaptive β that does move. Row 0's
    critic explains exactly none of the return's variance: the value head starts at 0, not at random values."""
    flags = (*SMALL, "--critic", "separate", "--kl-coef", "0.1", "--kl-target", "0.01", "--kl-horizon", "100")
    runs = [run_script("ppo.py", *flags, out_dir=tmp_path / str(i))[1] for i in range(2)]
    assert without_seconds(runs[0]) == without_seconds(runs[1])
    assert len({row["beta"] for row in training_rows(runs[0])}) == 2
    assert runs[0][0]["explained_variance"] == 0.0


@pytest.mark.slow
def test_default_run_improves_eval_accuracy_on_a_fixed_budget(tmp_path):
    _, rows = run_script("ppo.py", "--total-episodes", "2048", "--eval-every", "2048", out_dir=tmp_path)
    assert rows[-1]["episodes"] == 2048 and rows[-1]["eval_accuracy"] >= rows[0]["eval_accuracy"] + 0.15


def test_the_critic_regresses_on_returns_taken_before_whitening_and_the_last_update_runs_at_lr_over_n(
    tmp_path, monkeypatch
):
    """Every minibatch's returns are GAE's R_t = A_t + V_old(s_t) from the raw advantages, and its advantages
    are those advantages whitened over the batch: whitening first would give the critic targets in units of
    standard deviations. And iteration i of N steps at lr·(1 − (i − 1)/N): the last batch moves the policy little."""
    batches, seen, gae, rollout, update = [], [], ppo.gae, ppo.rollout, ppo.update_minibatch

    def collect(*args):
        batch, prompt_width = rollout(*args)
        batches.append({"ids": batch["ids"]})
        return batch, prompt_width

    def advantages_and_returns(rewards, values, mask, *args):
        batches[-1].update(zip(("advantages", "returns"), gae(rewards, values, mask, *args)), mask=mask)
        return batches[-1]["advantages"], batches[-1]["returns"]

    def step(learner, optimizer, minibatch, *args):
        seen.append((len(batches) - 1, optimizer.param_groups[0]["lr"], minibatch))
        return update(learner, optimizer, minibatch, *args)

    monkeypatch.setattr(ppo, "rollout", collect)
    monkeypatch.setattr(ppo, "gae", advantages_and_returns)
    monkeypatch.setattr(ppo, "update_minibatch", step)
    flags = [*SMALL, "--total-episodes", "48", "--learning-rate", "1e-4", "--kl-coef", "0.1"]
    run_main(ppo, *flags, "--output-dir", str(tmp_path))
    assert sorted({i for i, _, _ in seen}) == [1, 2, 3] and len(seen) == 3 * 2 * 2  # 3 updates of 2 x 2 steps
    for i, lr, minibatch in seen:
        assert lr == pytest.approx(1e-4 * (1 - (i - 1) / 3))
        batch = batches[i]
        rows = [
            next(r for r in range(len(batch["ids"])) if torch.equal(batch["ids"][r], ids)) for ids in minibatch["ids"]
        ]
        assert torch.equal(batch["returns"][rows], minibatch["returns"])
        assert torch.equal(ppo.whiten(batch["advantages"], batch["mask"])[rows], minibatch["advantages"])
        valid = minibatch["mask"]
        assert torch.equal((batch["advantages"][rows] + minibatch["values_old"])[valid], minibatch["returns"][valid])


def test_each_epoch_takes_every_response_of_the_one_batch_once_in_minibatches_shuffled_anew(tmp_path, monkeypatch):
    """Several epochs on one batch: an update is --ppo-epochs passes over the batch collected once, each pass
    --num-minibatches steps on disjoint minibatches that together hold every response exactly once, in an order
    drawn anew each epoch; every step reads the batch's own π_old, V_old, A and R (nothing is collected or
    recomputed between epochs)."""
    batches, steps, rollout, update = [], [], ppo.rollout, ppo.update_minibatch

    def collect(*args):
        batch, prompt_width = rollout(*args)
        batches.append(batch | {"row": torch.arange(len(batch["ids"]))})  # a label that travels with each response
        return batches[-1], prompt_width

    def step(learner, optimizer, minibatch, *args):
        steps.append((len(batches) - 1, minibatch))
        return update(learner, optimizer, minibatch, *args)

    monkeypatch.setattr(ppo, "rollout", collect)
    monkeypatch.setattr(ppo, "update_minibatch", step)
    run_main(ppo, *SMALL, "--kl-coef", "0.1", "--output-dir", str(tmp_path))  # 16 responses, 2 epochs x 2 minibatches
    assert [i for i, _ in steps] == [1] * 4 + [2] * 4
    for i in (1, 2):
        batch, minibatches = batches[i], [m for j, m in steps if j == i]
        orders = [torch.cat([m["row"] for m in minibatches[e * 2 : e * 2 + 2]]) for e in range(2)]
        for order in orders:
            assert [len(m["row"]) for m in minibatches] == [8] * 4 and sorted(order.tolist()) == list(range(16))
        assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], torch.arange(16))
        for minibatch in minibatches:
            for key in ("ids", "mask", "logp_old", "values_old", "advantages", "returns"):
                assert torch.equal(minibatch[key], batch[key][minibatch["row"]]), key


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_the_value_head_starts_at_zero_so_row_0_explains_none_of_the_returns(tmp_path, critic):
    """V = 0 before the first update, on either critic's body: row 0's explained variance, 1 − Var(R − V)/Var(R),
    is exactly 0, not the chance fit (or misfit) of a randomly initialised head: no prior about rewards."""
    rows = run_main(ppo, *SMALL, "--critic", critic, "--kl-coef", "0.1", "--output-dir", str(tmp_path))
    assert rows[0]["explained_variance"] == 0.0


# ---- Bad input and a diverging run, in process: they end before any training ----
def ppo_exit_message(monkeypatch, out_dir, *flags) -> str:
    return exit_message(monkeypatch, ppo.main, ["ppo.py", *SMALL, *flags, "--output-dir", str(out_dir)])


@pytest.mark.parametrize("flags, names", [
    (["--clip-range", "-0.1"], "--clip-range"),
    (["--value-clip-range", "0"], "--value-clip-range"),
    (["--num-prompts", "10", "--num-minibatches", "4"], "--num-prompts 10 must split into --num-minibatches 4"),
    (["--gae-lambda", "1.5"], "--gae-lambda"),
    (["--kl-target", "6"], "--kl-coef"),
    (["--critic", "both"], "--critic expects one of shared, separate, got 'both'"),
    (["--no-such-flag", "1"], "no-such-flag"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--reward-model", "/nonexistent/rm"], "/nonexistent/rm"),
])  # fmt: skip
def test_bad_input_is_one_error_line_before_any_work(monkeypatch, capsys, tmp_path, flags, names):
    message = ppo_exit_message(monkeypatch, tmp_path / "run", *flags)
    assert_one_error_line_before_any_work(message, names, capsys, tmp_path / "run")


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_stderr_line_and_a_nonzero_exit(tmp_path):
    proc, _ = run_script("ppo.py", "--clip-range", "-1", out_dir=tmp_path / "run", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == ["error: --clip-range must be > 0"]


def test_a_diverging_run_stops_naming_the_iteration_and_the_last_save(monkeypatch, tmp_path, capsys):
    """The non-finite gradient's FloatingPointError leaves the loop; one_line_errors says where it stopped."""
    monkeypatch.setattr(sys, "argv", ["ppo.py", *SMALL, "--learning-rate", "1e30", "--output-dir", str(tmp_path)])
    message = error_line(ppo, capsys, ppo.main)
    assert message == f"error: non-finite gradient at iteration 1; the last save is in {tmp_path}"
