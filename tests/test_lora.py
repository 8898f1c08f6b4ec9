"""LoRA in ppo.py and grpo.py (--lora-rank): adapters on the linear layers of a frozen model, π_ref as the same
model with its adapters off. On nn.Linear (Llama) and on Conv1D (GPT-2, the embedded policy's layer)."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from tiny import exit_message, run_main, tiny_model

CPU = torch.device("cpu")
NAMES = ["ppo", "grpo"]


def lora_args(rank: int = 2) -> SimpleNamespace:
    """What adapted() reads of the command line."""
    return SimpleNamespace(lora_rank=rank, lora_alpha=16.0, lora_targets="all-linear")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base(request, tmp_path_factory):
    """A tiny float64 model (GPT-2's Conv1D, or Llama's nn.Linear), a batch of left-padded prompts with responses
    of unequal length, and the module whose LoRA is tested (the same code in both scripts: test_shared.py)."""
    path = tiny_model(tmp_path_factory.mktemp(request.param), request.param, dtype=torch.float64)
    import ppo

    model, tok = ppo.load_policy(str(path), CPU, torch.float64)
    torch.manual_seed(0)
    ids, attn, prompt_width, mask, _ = ppo.sample(model, tok, ["1+2=", "40+55=", "7+61=", "99+99="] * 2, 5, 2.0, 8)
    return SimpleNamespace(path=path, tok=tok, batch=(ids, attn, prompt_width), mask=mask)


def lora_policy(module, base, rank: int = 2):
    model = module.load_policy(str(base.path), CPU, torch.float64)[0]
    return module.adapted(model, lora_args(rank))


def logp(module, model, base):
    with torch.no_grad():
        return module.token_logprobs(model, *base.batch, 1.0)[0]


def train_adapters(policy):
    """Move the adapters as training would: B away from 0."""
    with torch.no_grad():
        for B in policy.adapters.B.values():
            B.normal_(0, 0.1)


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_lora_policys_log_probs_equal_the_base_models_bit_for_bit(name, base):
    """B = 0 at the start: W₀x + (α/r)·B·A·x adds an exact 0, on every linear layer of the body."""
    module = importlib.import_module(name)
    plain = module.load_policy(str(base.path), CPU, torch.float64)[0]
    policy = lora_policy(module, base)
    assert len(policy.adapters.layers) >= 4  # attention and MLP layers of both blocks
    assert torch.equal(logp(module, policy, base), logp(module, plain, base))


@pytest.mark.parametrize("name", NAMES)
def test_with_the_adapters_off_the_log_probs_equal_the_base_models_after_training(name, base):
    """π_ref = the policy with its adapters off: bit for bit the base model, whatever the adapters learnt; with
    them on, another policy."""
    module = importlib.import_module(name)
    plain = module.load_policy(str(base.path), CPU, torch.float64)[0]
    policy = lora_policy(module, base)
    train_adapters(policy)
    assert torch.equal(logp(module, module.WithoutAdapters(policy), base), logp(module, plain, base))
    assert not torch.allclose(logp(module, policy, base), logp(module, plain, base))


def test_only_the_adapters_and_the_value_head_receive_gradients(base):
    """ppo's loss, through the policy's log-probs and the value head on its body: every frozen weight of the
    model (the body, the embeddings, the LM head) gets no gradient; each adapter's A and B and the head do."""
    import ppo

    policy = lora_policy(ppo, base)
    train_adapters(policy)  # so that A gets a gradient too (∂/∂A is 0 while B = 0)
    head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float64)
    agent = ppo.PolicyAndCritic(policy, head)
    logp_, _, values = agent(*base.batch, 1.0)
    (torch.where(base.mask, logp_ + values, 0.0).sum()).backward()
    trained = {n for n, p in agent.named_parameters() if p.grad is not None}
    expected = {n for n, _ in agent.named_parameters() if n.startswith(("policy.adapters.", "value_head."))}
    assert trained == expected and len(expected) == 2 * len(policy.adapters.layers) + 2
    assert all(agent.get_parameter(n).grad.abs().sum() > 0 for n in expected)


@pytest.mark.parametrize("name", NAMES)
def test_the_saved_model_loads_with_from_pretrained_to_the_lora_policys_log_probs(name, base, tmp_path):
    """A save holds W₀ + (α/r)·B·A in each adapted layer (transposed for a Conv1D): from_pretrained, without this
    code, gives the trained policy's log-probs (to 1e-10 in float64: only the order of the sums differs)."""
    module = importlib.import_module(name)
    policy = lora_policy(module, base)
    train_adapters(policy)
    module.save(policy, base.tok, tmp_path / "model", {})
    saved = module.load_policy(str(tmp_path / "model"), CPU, torch.float64)[0]
    assert not hasattr(saved, "adapters")
    torch.testing.assert_close(logp(module, saved, base), logp(module, policy, base), rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_lora_run_starts_with_the_ratio_at_1_and_no_kl_to_pi_ref(name, tmp_path):
    """π_ref is π_θ with its adapters off, and the adapters start at 0: iteration 0's KL is exactly 0 (a separately
    loaded π_ref gives a rounding error on a GPU), and so is every first minibatch's |r_t − 1|."""
    module = importlib.import_module(name)
    flags = {"ppo": ["--num-prompts", "8", "--num-minibatches", "2", "--critic", "separate"],
             "grpo": ["--num-prompts", "4", "--group-size", "2", "--kl-penalty", "k3-loss"]}[name]  # fmt: skip
    rows = run_main(module, *flags, "--lora-rank", "1", "--kl-coef", "0.1", "--learning-rate", "1e-3",
                    "--max-new-tokens", "4", "--total-episodes", "16", "--eval-every", "100000",
                    "--output-dir", str(tmp_path))  # fmt: skip
    assert rows[0]["kl"] == 0.0 and rows[0]["kl_k3"] == 0.0
    assert [row["first_minibatch_ratio_error"] for row in rows[1:]] == [0.0] * (len(rows) - 1)
    assert rows[-1]["kl"] != 0.0  # the adapters moved the policy away from π_ref
    state = torch.load(tmp_path / "model" / "training_state.pt", weights_only=True)
    assert "adapters" in state and all(k.startswith(("A.", "B.")) for k in state["adapters"])


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora-rank", "1", "--lora-targets", "no_such_proj"], "--lora-targets no_such_proj: no linear layer"),
])  # fmt: skip
@pytest.mark.parametrize("name", NAMES)
def test_bad_lora_flags_are_one_error_line_before_any_training(name, flags, message, monkeypatch, tmp_path):
    module = importlib.import_module(name)
    text = exit_message(monkeypatch, module.main, [f"{name}.py", *flags, "--output-dir", str(tmp_path)])
    assert text.startswith("error: " + message) and "\n" not in text
    assert not (tmp_path / "metrics.jsonl").exists()
