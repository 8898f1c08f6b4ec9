"""reward_model.py: the Bradley-Terry loss, the gold preference and the label noise, the score read at each
text's last token, the shift that makes the starting policy score 0, the copies of ppo.py's code, and the
script end to end: a folder ppo.py loads, the same run from the same seed, one error line on bad input.
Each test's name or docstring states the invariant it checks."""

import copy
import inspect
import json
import math
import random
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import ppo
import reward_model as rm
from tiny import CHECKPOINT, assert_one_error_line_before_any_work, exit_message, run_script, score_alone, tiny_model

CPU = torch.device("cpu")


def tensors(n: int):
    return st.lists(st.floats(-20, 20), min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))


score_pairs = st.integers(1, 16).flatmap(lambda n: st.tuples(tensors(n), tensors(n)))
# What the reward model reads: token ids as sampled (the embedded vocabulary: 0 <pad>, 1 <eos>, 2-13 the characters),
# a prompt and a response that ends on EOS when it stopped.
PAD, EOS = 0, 1
sequences = st.lists(
    st.tuples(
        st.lists(st.integers(2, 13), min_size=1, max_size=6), st.lists(st.integers(0, 13), max_size=5), st.booleans()
    ),  # fmt: skip
    min_size=1,
    max_size=8,
)


def sampler_layout(drawn) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The drawn (prompt, response, stopped) as the sampler lays them out: prompts left-padded, responses
    right-padded, one attention mask; and each sequence's real tokens alone."""
    prompts = [p for p, _, _ in drawn]
    responses = [r + [EOS] if stopped else r for _, r, stopped in drawn]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    ids = torch.tensor(
        [[PAD] * (width_p - len(p)) + p + r + [PAD] * (width_r - len(r)) for p, r in zip(prompts, responses)]
    )
    attn = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r))
                         for p, r in zip(prompts, responses)])  # fmt: skip
    return ids, attn, [torch.tensor(p + r) for p, r in zip(prompts, responses)]


# ---- The Bradley-Terry loss ----
@given(score_pairs, st.floats(-100, 100))
def test_the_loss_depends_only_on_score_differences(pair, shift):
    """Adding one constant to every score, chosen and rejected alike, leaves every pair's loss unchanged."""
    chosen, rejected = pair
    loss = rm.bradley_terry_loss(chosen, rejected)
    assert_close(rm.bradley_terry_loss(chosen + shift, rejected + shift), loss, rtol=1e-9, atol=1e-9)


@given(score_pairs)
def test_the_gradient_is_one_minus_p_pulling_chosen_up_and_rejected_down(pair):
    """loss = −log σ(Δ), Δ = r_chosen − r_rejected; ∂loss/∂r_chosen = −(1 − σ(Δ)) = −∂loss/∂r_rejected: a
    pair pulls by how far the modelled P(chosen ≻ rejected) falls short of 1."""
    chosen, rejected = (x.clone().requires_grad_(True) for x in pair)
    loss = rm.bradley_terry_loss(chosen, rejected)
    grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (chosen, rejected))
    delta = (chosen - rejected).detach()
    assert_close(loss.detach(), torch.log1p(torch.exp(-delta)), rtol=1e-12, atol=1e-12)
    assert_close(grad_chosen, -(1 - delta.sigmoid()), rtol=1e-12, atol=1e-12)
    assert_close(grad_rejected, 1 - delta.sigmoid(), rtol=1e-12, atol=1e-12)


# ---- The gold preference and the label noise ----
@st.composite
def two_responses(draw):
    """Two responses to one training prompt; right ones are common."""
    a, b = draw(st.sampled_from(rm.TRAIN_PAIRS))
    completion = st.one_of(st.just(str(a + b)), st.text("0123456789", max_size=4))
    return [rm.Response(rm.prompt_of(a, b), draw(completion), draw(st.booleans()), torch.tensor([i])) for i in (0, 1)]


@given(two_responses())
def test_right_beats_wrong_and_a_pair_without_a_gold_preference_is_skipped(responses):
    """The right response (task reward 1) is chosen over the wrong one, in either order; both right or
    both wrong (a cut-off response is wrong) gives None: the pair is skipped."""
    first, second = responses
    pair = rm.preference(first, second)
    gold = lambda r: rm.reward(r.prompt, r.completion, r.finished)
    if gold(first) == gold(second):
        assert pair is None
    else:
        chosen, rejected = pair
        assert {chosen, rejected} == {first, second} and (gold(chosen), gold(rejected)) == (1.0, 0.0)


@settings(max_examples=30)
@given(st.floats(0, 0.5), st.integers(0, 2**32 - 1))
def test_label_noise_swaps_exactly_the_pairs_its_generator_picks_about_p_of_them(p, seed):
    """Pair i is swapped iff the i-th draw of the seeded generator is below p, else left as it was; over
    4000 pairs the share swapped is within 5 standard deviations of p."""
    pairs = [(("chosen", i), ("rejected", i)) for i in range(4000)]
    draws = random.Random(seed)
    expected = [draws.random() < p for _ in pairs]
    noisy = rm.flip_labels(pairs, p, random.Random(seed))
    assert noisy == [(r, c) if swap else (c, r) for (c, r), swap in zip(pairs, expected)]
    assert abs(sum(expected) - p * len(pairs)) <= 5 * math.sqrt(len(pairs) * p * (1 - p)) + 1e-9


# ---- The score: read at each sequence's last token, shifted so the starting policy's samples score 0 ----
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A random 2-layer GPT-2, made a classifier as the script makes one. Score weights of order 1, so that
    reading the wrong position shows."""
    path = tiny_model(tmp_path_factory.mktemp("lm"), "gpt2")
    _, tok = rm.load_policy(str(path), CPU)  # the tokenizer as the script sets it up
    torch.manual_seed(0)
    model = rm.new_reward_model(str(path), tok, CPU)
    torch.nn.init.normal_(model.score.weight)
    return model.requires_grad_(False)


@pytest.mark.parametrize("layout", ["sampler", "right-padded"])
@settings(max_examples=20)
@given(drawn=sequences, batch_size=st.integers(1, 8))
def test_a_score_does_not_depend_on_the_padding_or_on_the_rest_of_the_batch(classifier, layout, drawn, batch_size):
    """Sequences of different lengths, some ending on EOS, some holding a pad id inside, scored in chunks of
    batch_size as the sampler lays them out (prompts left-padded, responses right-padded) or right-padded
    (as reward_model.py batches them), each get the score they get alone: read at their own last real
    token by the attention mask, never by a pad id."""
    ids, attn, alone = sampler_layout(drawn)
    if layout == "right-padded":
        ids, attn = rm.padded(alone)
    expected = torch.tensor([score_alone(classifier, seq) for seq in alone], dtype=torch.float64)
    assert_close(rm.reward_model_scores(classifier, ids, attn, batch_size).double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=20)
@given(drawn=sequences, previous_offset=st.floats(-3, 3), batch_size=st.integers(1, 8))
def test_after_calibration_the_samples_score_mean_zero_and_standard_deviation_one(
    classifier, drawn, previous_offset, batch_size
):
    """calibrate divides the score head by the samples' raw standard deviation and stores their divided mean in
    config.reward_offset, whatever offset the model had before: reward_model_scores then gives them mean 0
    and standard deviation 1, each score (raw − mean)/std, so every preference stays. To 1e-5 times max|raw|/std
    (at least 1e-5): the model computes in float32, and dividing by a small std magnifies its rounding."""
    model = copy.deepcopy(classifier)  # calibrate changes its score head
    samples = sampler_layout(drawn)[2]
    raw = torch.tensor([score_alone(model, seq) for seq in samples], dtype=torch.float64)
    model.config.reward_offset = previous_offset
    offset, scale = rm.calibrate(model, samples, batch_size)
    scores = rm.reward_model_scores(model, *rm.padded(samples), batch_size).double()
    std = raw.std(correction=0).item()
    tol = 1e-5 * max(1.0, raw.abs().max().item() / std) if std > 0 else 1e-5
    assert model.config.reward_offset == offset and abs(scores.mean().item()) < tol
    if std > 1e-3:
        assert scale == pytest.approx(std, rel=1e-4)
        assert scores.std(correction=0).item() == pytest.approx(1.0, abs=tol)
        assert_close(scores, (raw - raw.mean()) / std, rtol=1e-4, atol=10 * tol)


# ---- Copied from ppo.py, identical ----
COPIED = ["reward_model_scores", "reward", "prompt_of", "train_prompts", "eval_prompts", "cli_error", "load_policy",
          "positions", "autocast", "inverse_cdf", "sample_token", "sample", "Decoder", "default_generator", "capture",
          "prompt_ids", "conversations", "decode", "head_dtype", "product", "lm_head_logits",
          "one_line_errors", "check_versions"]  # fmt: skip


@pytest.mark.parametrize("name", COPIED)
def test_the_code_copied_from_ppo_is_identical(name):
    """reward_model_scores above all: the reward model trains on the very score of the very ids that PPO
    reads. And the task's prompts: the pairs come from the same training prompts."""
    assert inspect.getsource(getattr(rm, name)) == inspect.getsource(getattr(ppo, name))
    assert rm.TRAIN_PAIRS == ppo.TRAIN_PAIRS and rm.EVAL_PAIRS == ppo.EVAL_PAIRS


# ---- End to end, in this process ----
TINY = ["--num-pairs", "24", "--eval-pairs", "8", "--epochs", "2", "--batch-size", "8", "--micro-batch-size", "3",
        "--calibration-samples", "32", "--inference-batch-size", "64"]  # fmt: skip


def train(out_dir, *flags) -> dict:
    """Run reward_model.main() with TINY and flags on its command line; return its metrics.json."""
    argv, sys.argv = sys.argv, ["reward_model.py", *TINY, *flags, "--output-dir", str(out_dir)]
    try:
        rm.main()
    finally:
        sys.argv = argv
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_the_script_writes_a_reward_model_that_ppo_loads_with_its_offset(tmp_path, monkeypatch, capsys):
    """A tiny run samples training prompts only, writes a folder ppo.py's load_reward_model loads, whose
    config.reward_offset is the offset in metrics.json, and reports held-out accuracy before and after;
    every sampled pair is counted as kept or skipped, and label noise touched the training pairs only."""
    prompts, responses, noisy, flip_labels = [], rm.responses, [], rm.flip_labels
    monkeypatch.setattr(rm, "responses", lambda policy, tok, p, *a: prompts.extend(p) or responses(policy, tok, p, *a))
    monkeypatch.setattr(rm, "flip_labels", lambda pairs, *a: noisy.append(len(pairs)) or flip_labels(pairs, *a))
    metrics = train(tmp_path / "run", "--label-noise", "0.5")
    assert noisy == [16]
    train_prompts = {rm.prompt_of(a, b) for a, b in rm.TRAIN_PAIRS}
    assert prompts and set(prompts) <= train_prompts
    model = ppo.load_reward_model(str(tmp_path / "run"), CPU, torch.float32, AutoTokenizer.from_pretrained(CHECKPOINT))
    assert model.config.reward_offset == metrics["reward_offset"] != 0
    assert 0 <= metrics["held_out_accuracy_before"] <= 1 and 0 <= metrics["held_out_accuracy"] <= 1
    assert (metrics["num_pairs"], metrics["train_pairs"], metrics["eval_pairs"]) == (24, 16, 8)
    assert metrics["sampled_pairs"] == metrics["num_pairs"] + metrics["skipped_pairs"] and metrics["skipped_pairs"] > 0
    assert 0 < metrics["flipped_labels"] < 16
    assert json.loads((tmp_path / "run" / "args.json").read_text())["label_noise"] == 0.5
    out = capsys.readouterr().out
    expected = f"held-out accuracy {metrics['held_out_accuracy_before']:.3f} -> {metrics['held_out_accuracy']:.3f}"
    assert expected in out


@pytest.mark.slow
def test_the_same_seed_gives_the_same_metrics_and_weights(tmp_path):
    """Two runs from one seed, label noise included: the same metrics.json apart from `seconds`, and the
    same weights, bit for bit."""
    without_seconds = lambda metrics: {k: v for k, v in metrics.items() if k != "seconds"}
    runs = [train(tmp_path / name, "--label-noise", "0.25", "--seed", "3") for name in "ab"]
    assert without_seconds(runs[0]) == without_seconds(runs[1])
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- Bad input: one line, before any work ----
def two_labels(path):
    """A random GPT-2 sequence classifier with 2 labels: not a reward model."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("flags, names", [
    (["--model", "/nonexistent/model"], "cannot load /nonexistent/model"),
    (["--num-pairs", "8", "--eval-pairs", "8"], "--num-pairs 8 leaves no pair to train on after --eval-pairs 8"),
    (["--num-pairs", "1", "--eval-pairs", "1"], "--num-pairs 1 leaves no pair"),
    (["--eval-pairs", "0"], "--eval-pairs must be >= 1"),
    (["--label-noise", "0.6"], "--label-noise must be in [0, 0.5]"),
    (["--label-noise", "-0.1"], "--label-noise must be in [0, 0.5]"),
    (["--calibration-temperature", "0"], "--calibration-temperature must be > 0"),
    (["--epochs", "many"], "--epochs expects int, got 'many'"),
    (["--no-such-flag", "1"], "unrecognized flag --no-such-flag"),
    # One-token responses are never right (the answer and its EOS take two): no pair has a preference.
    (["--max-new-tokens", "1", "--num-pairs", "2", "--eval-pairs", "1"], "only 0 of 128 sampled pairs"),
])  # fmt: skip
def test_bad_input_is_one_error_line_before_any_work(monkeypatch, capsys, tmp_path, flags, names):
    argv = ["reward_model.py", *TINY, *flags, "--output-dir", str(tmp_path / "run")]
    assert_one_error_line_before_any_work(exit_message(monkeypatch, rm.main, argv), names, capsys, tmp_path / "run")


def test_an_output_dir_that_holds_something_else_is_refused_untouched(monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    message = exit_message(monkeypatch, rm.main, ["reward_model.py", *TINY, "--output-dir", str(tmp_path)])
    assert message.startswith(f"error: --output-dir {tmp_path} exists and is not a reward model's folder")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_ppo_refuses_a_reward_model_with_two_labels_in_one_line(monkeypatch, capsys, tmp_path):
    flags = ["--total-episodes", "16", "--num-prompts", "16", "--num-minibatches", "1"]
    argv = ["ppo.py", *flags, "--reward-model", str(two_labels(tmp_path / "rm")), "--output-dir", str(tmp_path / "run")]
    message = exit_message(monkeypatch, ppo.main, argv)
    assert_one_error_line_before_any_work(message, "has 2 labels; a reward model has 1", capsys, tmp_path / "run")


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_stderr_line_and_a_nonzero_exit(tmp_path):
    proc, _ = run_script("reward_model.py", "--num-pairs", "4", "--eval-pairs", "4", out_dir=tmp_path, check=False)
    expected = "error: --num-pairs 4 leaves no pair to train on after --eval-pairs 4"
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_runs_copied_alone(tmp_path):
    """One file, nothing else from this repository: copied elsewhere, it trains and saves."""
    (tmp_path / "reward_model.py").write_text((rm.HERE / "reward_model.py").read_text())
    flags = ("--model", str(CHECKPOINT), *TINY, "--output-dir", str(tmp_path / "run"))
    run_script(tmp_path / "reward_model.py", *flags, cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_pairs"] == 24
