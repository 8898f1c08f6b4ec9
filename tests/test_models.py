"""The models a user points the scripts at: vocabularies longer than the tokenizer, logits that go non-finite,
bf16 checkpoints, models that are not causal LMs or keep their body elsewhere, chat templates. Each fix is
checked in every script's copy of the machinery (the copies are also checked identical in test_shared.py)."""

import importlib
import json
import logging

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, Llama4ForCausalLM, Llama4TextConfig

from tiny import (
    CHECKPOINT,
    SMALL_RUN,
    assert_rendered_by_the_chat_template,
    error_line,
    run_main,
    score_alone,
    tiny_model,
)

SCRIPTS = ["reinforce", "actor_critic", "ppo", "grpo"]
LOADING = [*SCRIPTS, "reward_model"]  # every script that loads a policy
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=SCRIPTS)
def module(request):
    return importlib.import_module(request.param)


# ---- Ids past the tokenizer's vocabulary ----
@pytest.fixture(scope="module")
def padded_vocab(tmp_path_factory):
    """A tiny Llama whose embedding table has 5 rows more than its tokenizer has ids, as Qwen2.5's has 271."""
    return tiny_model(tmp_path_factory.mktemp("padded"), "llama", pad_token=False, extra_rows=5)


def loving_padding(model):
    """The model, its LM head given a bias of +50 on the rows past the tokenizer's ids: what a sampler over every
    row would pick."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()[model.token_id_limit :] = 50.0
    model.set_output_embeddings(biased)
    return model


@pytest.mark.parametrize("name", LOADING)
def test_load_policy_limits_the_ids_to_the_tokenizers(padded_vocab, name):
    model, tok = importlib.import_module(name).load_policy(str(padded_vocab), CPU)
    assert model.config.vocab_size == len(tok) + 5 and model.token_id_limit == len(tok)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_ids_past_the_tokenizers_are_never_sampled(module, padded_vocab, greedy):
    """Whatever logits a padding row of the embedding gets, the sampler never writes its id: it would decode to
    nothing, and neither `reward` nor a reward model could see it."""
    model, tok = module.load_policy(str(padded_vocab), CPU)
    torch.manual_seed(0)
    ids, _, prompt_width, _, _ = module.sample(loving_padding(model), tok, ["1+2=", "40+55="] * 8, 5, 1.0, 16, greedy)
    assert ids[:, prompt_width:].max() < len(tok)


# ---- Logits that are not finite ----
@pytest.mark.parametrize("row", ["nan", "all-minus-inf", "plus-inf"])
def test_sample_token_never_returns_an_id_outside_the_vocabulary(module, row):
    """A row with no distribution (NaN, all −inf, +inf) still gets an id below the vocabulary's size (on a GPU
    an id past it is a device-side assert far from the cause); the finite rows beside it are drawn as ever."""
    bad = {"nan": float("nan"), "all-minus-inf": float("-inf"), "plus-inf": float("inf")}[row]
    for vocab, block in [(5, 1024), (10, 4), (12, 3)]:
        logits = torch.zeros(3, vocab)
        logits[1] = bad
        logits[2, 1:] = float("-inf")  # a row whose only token is 0
        ids = module.sample_token(logits, 1.0, torch.rand(2, 3, dtype=torch.float64), block)
        assert ((0 <= ids) & (ids < vocab)).all() and ids[2] == 0


def breaks(model, step: int):
    """The model, its first row's hidden states (and so its logits) NaN from the given sampling step on."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) > step:
            out.last_hidden_state[0] = float("nan")

    model.base_model.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_sampling_from_nan_logits_raises_floating_point_error(module, greedy):
    model, tok = module.load_policy(str(CHECKPOINT), CPU)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        module.sample(breaks(model, step=1), tok, ["1+2="] * 4, 5, 1.0, 4, greedy)


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_policy_whose_logits_go_nan_stops_naming_the_iteration_and_keeps_the_last_save(
    name, tmp_path, monkeypatch, capsys
):
    """Adam's first step writes NaN into the weights; iteration 2 samples from them and stops with one error line
    naming it, and the save of iteration 0 stays as it was: finite weights that from_pretrained loads."""
    module = importlib.import_module(name)
    step = torch.optim.Adam.step

    def poisoned(self, *args, **kwargs):
        step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    flags = [*SMALL_RUN[name], "--max-new-tokens", "3", "--total-episodes", "80", "--eval-every", "100000"]
    message = error_line(module, capsys, lambda: run_main(module, *flags, "--output-dir", str(tmp_path)))
    assert message == f"error: the policy's logits are NaN or inf at iteration 2; the last save is in {tmp_path}"
    saved = module.load_policy(str(tmp_path / "model"), CPU)[0]
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert [json.loads(line)["iteration"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_the_entropy_is_finite_where_some_logits_are_minus_inf(module):
    """H = −Σ π log π over the tokens π gives mass: a −inf logit (a masked token) adds 0, not 0·(−inf) = NaN."""
    z = torch.tensor([[0.5, float("-inf"), -1.0, 2.0], [float("-inf"), 0.0, float("-inf"), 0.0]], dtype=torch.float64)
    entropy = []
    for row in z:  # the logits are the head's bias: its weight is 0
        head = torch.nn.Linear(1, 4, dtype=torch.float64)
        torch.nn.init.zeros_(head.weight), head.bias.data.copy_(row)
        with torch.no_grad():
            entropy.append(module.response_logprobs(head, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1]),
                                                    1.0, True, 4)[1])  # fmt: skip
    entropy = torch.cat(entropy)
    finite = z.isfinite()
    p = torch.where(finite, z, -1e300).softmax(-1)
    expected = -torch.where(finite, p * p.log(), 0.0).sum(-1)
    torch.testing.assert_close(entropy, expected, rtol=0, atol=1e-12)
    assert entropy[1].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


# ---- bf16 checkpoints, and the reward model's precision ----
def test_reward_model_py_trains_a_checkpoint_saved_in_bf16_in_float32(tmp_path):
    """Qwen2.5 and Llama 3 are saved in bf16, which from_pretrained keeps unless told: Adam would step bf16
    weights, whose small updates vanish. The new reward model is float32, score head included."""
    import reward_model as rm

    path = tiny_model(tmp_path, "llama", pad_token=False, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    _, tok = rm.load_policy(str(path), CPU)
    model = rm.new_reward_model(str(path), tok, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_bf16_reward_model_is_not_rounded_near_a_large_offset(tmp_path):
    """A bf16 reward model (π_ref and reward models are bf16 on a GPU) whose raw scores sit near 20: the head
    runs in float32, so the scores keep float32 precision before the offset of 20 is subtracted, where a bf16
    score is rounded to steps of 0.125, an eighth of the normalised standard deviation."""
    import ppo
    import reward_model as rm

    path = tiny_model(tmp_path, "gpt2")
    tok = AutoTokenizer.from_pretrained(path)
    model = rm.new_reward_model(str(path), tok, CPU)
    sequences = [torch.tensor(s) for s in ([3, 4, 1], [3, 5, 6, 1], [3, 7], [3, 8, 9, 10, 1])]
    with torch.no_grad():
        hidden = torch.stack([model.base_model(input_ids=s[None]).last_hidden_state[0, -1] for s in sequences])
        mean = hidden.mean(0)
        model.score.weight.copy_(20 * mean / mean.norm() ** 2)  # raw scores near 20
    model.config.reward_offset = 20.0
    model.save_pretrained(path)
    model = ppo.load_reward_model(str(path), CPU, torch.bfloat16, tok)
    scores = ppo.reward_model_scores(model, *rm.padded(sequences), 4)
    exact = torch.tensor([score_alone(model, s) for s in sequences], dtype=torch.float64) - 20
    assert ((exact + 20).abs() > 8).all() and (scores.double() - exact).abs().max() < 1e-4  # raw scores are large


# ---- Models that are not what the scripts can train ----
@pytest.mark.slow
@pytest.mark.parametrize("name", LOADING)
def test_a_bert_is_refused_as_not_a_causal_language_model(tmp_path, name):
    """AutoModelForCausalLM loads a BERT (as BertLMHeadModel); its first position sees the next token, so it
    is refused for that, in one line and before its missing EOS is noticed: transformers' advice to set
    is_decoder, a second line, stays unsaid."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    said, handler = [], logging.Handler()
    handler.emit = said.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(name).load_policy(str(tmp_path), CPU)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert (
        exited.value.code
        == f"error: {tmp_path} is not a causal language model: its first position sees the tokens after it"
    )
    assert [record.getMessage() for record in said if record.levelno >= logging.WARNING] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADING)
def test_a_model_whose_body_is_not_its_base_model_is_refused_in_one_line(tmp_path, name):
    """transformers' Llama4ForCausalLM keeps its body in .model while .base_model is the whole model, so the
    hidden states the scripts read would be logits: refused, not a traceback."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    config = Llama4TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_local_experts=2, eos_token_id=tok.eos_token_id)  # fmt: skip
    Llama4ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(name).load_policy(str(tmp_path), CPU)
    assert exited.value.code == f"error: {tmp_path}: Llama4ForCausalLM has no base_model to read the hidden states from"


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADING)
def test_the_logits_probe_applies_the_head_to_the_hidden_states_the_model_applied_it_to(tmp_path, name, monkeypatch):
    """The probe that refuses models transforming their logits compares like for like: the LM head on the same
    [batch, positions, hidden] input in both calls (on a head of another shape, bf16 rounding differs by more
    than the tolerance and would refuse a good bf16 π_ref on a GPU); and a bf16 model passes it."""
    module = importlib.import_module(name)
    path = tiny_model(tmp_path, "gpt2")
    shapes, linear = [], torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: shapes.append(tuple(x.shape)) or linear(self, x))
    module.load_policy(str(path), CPU, torch.bfloat16)
    assert len(shapes) == 2 and shapes[0] == shapes[1]


# ---- Chat models ----
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("chat"), "llama", pad_token=False, chat=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADING)
def test_a_conversation_is_rendered_by_the_chat_template_with_one_bos(chat_model, name):
    """A conversation becomes the template's ids with the generation prompt, tokenized once: one BOS. Text
    that a template already rendered (BOS included) is not given a second one; plain text gets the BOS the
    tokenizer writes; and --chat makes each text prompt a user's message."""
    module = importlib.import_module(name)
    _, tok = module.load_policy(str(chat_model), CPU, chat=True)
    conversation = [{"role": "user", "content": "12+34="}]
    expected = tok.convert_tokens_to_ids(
        ["<bos>", "<|user|>", "1", "2", "+", "3", "4", "=", "<|end|>", "<|assistant|>"]
    )
    assert module.prompt_ids(tok, conversation) == expected
    rendered = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2  # what tokenizing it again would give
    assert module.prompt_ids(tok, rendered) == expected
    assert module.prompt_ids(tok, "12+34=") == [tok.bos_token_id, *tok.convert_tokens_to_ids(list("12+34="))]
    assert module.conversations(["12+34=", conversation], chat=True) == [conversation, conversation]
    assert module.conversations(["12+34="], chat=False) == ["12+34="]


def test_chat_needs_a_chat_template():
    import ppo

    with pytest.raises(SystemExit) as exited:
        ppo.load_policy(str(CHECKPOINT), CPU, chat=True)
    assert exited.value.code == f"error: --chat: the tokenizer of {CHECKPOINT} has no chat template"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_trains_on_chat_prompts_sampled_from_the_template(chat_model, name, tmp_path, monkeypatch):
    """With --chat, every sampled sequence starts with the template: one BOS, the user's message, the
    assistant's marker; `reward` still judges the task's own prompt; and the run ends with a save."""
    module = importlib.import_module(name)
    sample, sampled = module.sample, []
    monkeypatch.setattr(module, "sample", lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1])
    rewarded, reward = [], module.reward
    monkeypatch.setattr(module, "reward", lambda prompt, *a: rewarded.append(prompt) or reward(prompt, *a))
    flags = [*SMALL_RUN[name], "--chat", "--model", str(chat_model), "--max-new-tokens", "3", "--total-episodes", "16"]
    rows = run_main(module, *flags, "--output-dir", str(tmp_path))
    assert [r["iteration"] for r in rows][-1] > 0 and (tmp_path / "model" / "training_state.pt").exists()
    tok = AutoTokenizer.from_pretrained(chat_model)
    for ids, attn, prompt_width, *_ in sampled:  # training batches and evaluations alike
        assert_rendered_by_the_chat_template(tok, ids, attn, prompt_width)
    assert rewarded and all(isinstance(p, str) and p.endswith("=") for p in rewarded)


@pytest.mark.slow
def test_a_reward_model_reads_the_conversation_the_policy_answered(chat_model, tmp_path, monkeypatch):
    """reward_model.py --chat trains on the sampled ids of the rendered conversations, and ppo.py --chat
    --reward-model scores exactly the ids it sampled: the template's tokens, one BOS, then the response."""
    import ppo
    import reward_model as rm

    flags = ["--model", str(chat_model), "--chat", "--num-pairs", "6", "--eval-pairs", "2", "--epochs", "1"]
    flags += ["--calibration-samples", "8", "--inference-batch-size", "32", "--max-new-tokens", "2"]
    monkeypatch.setattr(rm, "preference", lambda first, second: (first, second))  # a random model is never right
    monkeypatch.setattr("sys.argv", ["reward_model.py", *flags, "--output-dir", str(tmp_path / "rm")])
    sample, sampled = rm.sample, []
    monkeypatch.setattr(rm, "sample", lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1])
    rm.main()
    scored, score, ppo_sample = [], ppo.reward_model_scores, ppo.sample
    monkeypatch.setattr(ppo, "reward_model_scores", lambda *a: scored.append(a[1:3]) or score(*a))
    monkeypatch.setattr(ppo, "sample", lambda *a, **k: sampled.append(ppo_sample(*a, **k)) or sampled[-1])
    flags = [*SMALL_RUN["ppo"], "--chat", "--model", str(chat_model), "--max-new-tokens", "3", "--total-episodes", "8"]
    run_main(ppo, *flags, "--reward-model", str(tmp_path / "rm"), "--output-dir", str(tmp_path / "ppo"))
    tok = AutoTokenizer.from_pretrained(chat_model)
    for ids, attn, prompt_width, *_ in sampled:  # reward_model.py's pairs, then ppo.py's batches
        assert_rendered_by_the_chat_template(tok, ids, attn, prompt_width)
    assert scored and all(
        any(torch.equal(ids, s[0]) and torch.equal(attn, s[1]) for s in sampled) for ids, attn in scored
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_batch_whose_scores_are_all_equal_is_said_once(name, tmp_path, capsys):
    """One new token: every response is cut off and scores 0, so no batch teaches anything; the console says
    so once, at the first such iteration, not every iteration."""
    module = importlib.import_module(name)
    flags = [*SMALL_RUN[name], "--max-new-tokens", "1", "--total-episodes", "32", "--eval-every", "100000"]
    run_main(module, *flags, "--output-dir", str(tmp_path))
    out = capsys.readouterr().out
    assert out.count("note: every response at iteration 0 scored 0:") == 1 and out.count("note:") == 1


def test_a_reward_model_with_another_vocabulary_is_refused_in_one_line(chat_model, tmp_path, monkeypatch):
    """The reward model reads the ids the policy sampled, which mean nothing in another vocabulary: a reward
    model made from the chat model (4 more tokens) is refused for the embedded policy, before any work."""
    import ppo
    import reward_model as rm

    _, tok = rm.load_policy(str(chat_model), CPU)
    rm.new_reward_model(str(chat_model), tok, CPU).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    monkeypatch.setattr(
        "sys.argv", ["ppo.py", "--reward-model", str(tmp_path / "rm"), "--output-dir", str(tmp_path / "run")]
    )
    with pytest.raises(SystemExit) as exited:
        ppo.main()
    assert exited.value.code == (
        f"error: --reward-model {tmp_path / 'rm'} has another vocabulary than the policy: it reads the ids sampled"
    )
    assert not (tmp_path / "run").exists()
