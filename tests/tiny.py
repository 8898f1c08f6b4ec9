"""Small things the tests share: tiny Hugging Face models built from a config, and an
autoregressive policy small enough to enumerate every response it can produce."""

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "sft-addition"


# A chat template in the manner of Llama 3's: BOS, then each message between role markers and an end marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# The smallest batch of each script that takes a gradient step: for the runs that test plumbing, not learning.
SMALL_RUN = {
    "reinforce": ["--num-prompts", "4", "--samples-per-prompt", "2"],
    "actor_critic": ["--num-prompts", "8"],
    "ppo": ["--num-prompts", "8", "--num-minibatches", "1", "--ppo-epochs", "1"],
    "grpo": ["--num-prompts", "4", "--group-size", "2", "--num-minibatches", "1", "--ppo-epochs", "1"],
}


def assert_rendered_by_the_chat_template(tok, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int) -> None:
    """Each row's prompt (its real tokens before column prompt_width) is a conversation as CHAT_TEMPLATE renders it
    with the generation prompt: one BOS, the user's marker, ..., the assistant's marker."""
    head, tail = tok.convert_tokens_to_ids(["<bos>", "<|user|>"]), tok.convert_tokens_to_ids("<|assistant|>")
    for row, keep in zip(ids[:, :prompt_width], attn[:, :prompt_width].bool()):
        prompt = row[keep].tolist()
        assert prompt[:2] == head and prompt[-1] == tail and prompt.count(tok.bos_token_id) == 1, tok.decode(prompt)


def tiny_model(path: Path, arch: str = "gpt2", pad_token: bool = True, padding_side: str = "right",
               dtype: torch.dtype = torch.float32, seed: int = 0, stop_ids: tuple[int, ...] = (),
               dropout: float = 0.0, extra_rows: int = 0, chat: bool = False) -> Path:  # fmt: skip
    """Save a randomly initialised 2-layer model of `arch` (gpt2, llama or neox) with the embedded
    character tokenizer at `path`. pad_token=False removes the pad token, as Llama's tokenizer has none;
    the default right padding side checks that the scripts pad prompts on the left themselves.
    stop_ids are listed in its generation config beside EOS, as instruct models list several;
    dropout > 0 switches on every dropout its config names; extra_rows pads the embedding table past the
    tokenizer's ids, as Qwen2.5's is. chat=True gives the tokenizer a BOS that it writes before every text, as
    Llama 3's does, and CHAT_TEMPLATE with its markers <|user|>, <|assistant|> and <|end|>, a stop token."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    if not pad_token:
        tok.pad_token = None
    tok.padding_side = padding_side
    if chat:
        tok.add_special_tokens(
            {"bos_token": "<bos>", "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]}
        )
        tok.chat_template = CHAT_TEMPLATE
        tok._tokenizer.post_processor = TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
        )
        stop_ids = (*stop_ids, tok.convert_tokens_to_ids("<|end|>"))
    common = dict(vocab_size=len(tok) + extra_rows, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)  # fmt: skip
    config = {
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=dropout,
                                   embd_pdrop=dropout, attn_pdrop=dropout, **common),
        "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, max_position_embeddings=32, attention_dropout=dropout,
                                     **common),
        "neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=32, hidden_dropout=dropout, attention_dropout=dropout,
                                      **common),
    }[arch]()  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if stop_ids:
        model.generation_config.eos_token_id = [tok.eos_token_id, *stop_ids]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Oracle(torch.nn.Module):
    """A causal LM, to the scripts' sampler and to sft.py's, that writes the sum of each prompt and then EOS, or
    for the pairs in `answers` the token ids given there. To the scripts' sampler, its hidden state is the one-hot
    of the token it writes and its LM head 100·I; it keeps the ids so far on the KV cache it is handed."""

    def __init__(self, tok, answers: dict | None = None):
        super().__init__()
        self.tok, self.answers = tok, answers or {}
        self.generation_config = SimpleNamespace(eos_token_id=[tok.eos_token_id])
        self.device, self.token_id_limit = torch.device("cpu"), len(tok)
        self.config = GPT2Config(vocab_size=len(tok), n_embd=4, n_layer=1, n_head=1)  # for the sampler's cache
        self.head = torch.nn.Linear(len(tok), len(tok), bias=False)
        self.head.weight.data = 100.0 * torch.eye(len(tok))

    def next_tokens(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
        """The token each row writes next, from its real tokens so far."""
        out = []
        for seq, mask in zip(ids.tolist(), attention_mask[:, : ids.shape[1]].tolist()):
            text = self.tok.decode([t for t, m in zip(seq, mask) if m])
            prompt, written = text.split("=", 1)
            a, b = map(int, prompt.split("+"))
            answer = self.answers.get((a, b), self.tok(str(a + b))["input_ids"] + [self.tok.eos_token_id])
            n = len(self.tok(written)["input_ids"]) if written else 0
            out.append(answer[n] if n < len(answer) else self.tok.eos_token_id)
        return out

    def forward(self, input_ids, attention_mask, **kwargs):  # sft.py's greedy_accuracy: the whole sequence each time
        logits = torch.zeros(len(input_ids), input_ids.shape[1], len(self.tok))
        logits[:, -1] = 100.0 * torch.nn.functional.one_hot(torch.tensor(self.next_tokens(input_ids, attention_mask)),
                                                            len(self.tok))  # fmt: skip
        return SimpleNamespace(logits=logits)

    def base_model(self, input_ids, attention_mask, cache, **kwargs):
        cache.ids = input_ids if not hasattr(cache, "ids") else torch.cat([cache.ids, input_ids], 1)
        hidden = torch.zeros(len(input_ids), input_ids.shape[1], len(self.tok))
        hidden[:, -1] = torch.nn.functional.one_hot(torch.tensor(self.next_tokens(cache.ids, attention_mask)),
                                                    len(self.tok))  # fmt: skip
        return SimpleNamespace(last_hidden_state=hidden)

    def get_output_embeddings(self):
        return self.head


# ---- An enumerable policy ----
# Vocabulary: 0 = EOS, 1 = "a", 2 = "b", 3 = the one-token prompt. Responses have at most
# MAX_LEN tokens; one that reaches MAX_LEN without EOS is cut off. PAD is only a filler id.
EOS, PROMPT, PAD, VOCAB, MAX_LEN = 0, 3, 0, 3, 3


def all_responses(max_len: int = MAX_LEN) -> list[tuple[int, ...]]:
    """Every response the policy can produce: ends in EOS, or is cut off at max_len."""
    out = []
    for n in range(1, max_len + 1):
        for body in itertools.product((1, 2), repeat=n - 1):
            out.append(body + (EOS,))
    out += list(itertools.product((1, 2), repeat=max_len))
    return out


def prefixes(max_len: int = MAX_LEN) -> list[tuple[int, ...]]:
    """Every state s_t: the response tokens emitted so far (EOS never continues)."""
    return [p for n in range(max_len) for p in itertools.product((1, 2), repeat=n)]


def response_batch(responses=None):
    """The sampler's output format for `responses`: ids [N, 1+T], attention mask, prompt width 1,
    and the response mask (1 up to and including EOS). Padding after EOS is PAD."""
    responses = responses if responses is not None else all_responses()
    width = max(map(len, responses))
    ids = torch.tensor([[PROMPT, *r] + [PAD] * (width - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses], dtype=torch.bool)
    attn = torch.cat([torch.ones(len(responses), 1, dtype=torch.long), response_mask.long()], 1)
    return ids, attn, 1, response_mask


class TabularPolicy(torch.nn.Module):
    """π_θ(a | s) = softmax(θ[s]) with one row of logits per prefix s. It has the parts of a Hugging Face
    causal LM that the scripts use to score responses: base_model(...).last_hidden_state, a one-hot of
    the prefix (so a linear value head on it is a tabular critic), and get_output_embeddings(), the LM
    head h -> h·θ. So the scripts' own forward passes run on it unchanged."""

    def __init__(self, theta: torch.Tensor | None = None, max_len: int = MAX_LEN):
        super().__init__()
        self.index = {p: i for i, p in enumerate(prefixes(max_len))}
        if theta is None:
            theta = torch.zeros(len(self.index), VOCAB, dtype=torch.float64)
        self.theta, self.token_id_limit = torch.nn.Parameter(theta), VOCAB

    def base_model(self, input_ids, **kwargs):
        # Prefixes that run past EOS into padding are not states; row 0 stands in (masked anyway).
        rows = torch.tensor([[self.index.get(tuple(seq[1 : t + 1]), 0) for t in range(len(seq))]
                             for seq in input_ids.tolist()])  # fmt: skip
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(rows, len(self.index)).to(self.theta))

    def get_output_embeddings(self):
        return TableHead(self.theta)

    def prob(self, response: tuple[int, ...]) -> torch.Tensor:
        """π_θ(y) = Π_t π_θ(y_t | y_<t), differentiable in θ."""
        logp = torch.log_softmax(self.theta, -1)
        return torch.exp(sum(logp[self.index[response[:t]], a] for t, a in enumerate(response)))


class TableHead:
    """The tabular policy's LM head: logits = one-hot(s)·θ, with .weight [VOCAB, states] and no bias, like
    nn.Linear(bias=False)."""

    def __init__(self, theta):
        self.theta, self.weight, self.bias = theta, theta.T, None

    def __call__(self, hidden):
        return hidden @ self.theta


def score_alone(model, ids: torch.Tensor) -> float:
    """A reward model's raw score of one sequence of token ids, unpadded: its score head on the last position's
    hidden state, in float64."""
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids[None]).last_hidden_state[0, -1]
        return (hidden.double() @ model.score.weight.double().T).item()


# ---- Running a script end to end ----
def run_script(
    script: str | Path, *flags: str, out_dir: Path | None = None, cwd: Path | None = None, check: bool = True
):
    """Run `python script flags...` in a subprocess (one thread, as a test neighbour to others) and
    return (completed process, metrics.jsonl rows). Budgets are in episodes, never in seconds."""
    import json
    import os
    import subprocess
    import sys

    script = Path(script) if Path(script).is_absolute() else ROOT / script
    cmd = [sys.executable, str(script), *flags] + (["--output-dir", str(out_dir)] if out_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = out_dir / "metrics.jsonl" if out_dir else None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics and metrics.exists() else []
    return proc, rows


def run_main(module, *flags: str) -> list[dict]:
    """Run `module.main()` in this process with `flags` on its command line (--output-dir among them),
    and return the rows of the metrics.jsonl it wrote."""
    import json

    out_dir = Path(flags[flags.index("--output-dir" if "--output-dir" in flags else "--resume") + 1])
    argv = sys.argv
    sys.argv = [module.__name__ + ".py", *flags]
    try:
        module.main()
    finally:
        sys.argv = argv
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# ---- Bad input, in process: faster than a subprocess ----
def exit_message(monkeypatch, main, argv: list[str]) -> str:
    """What main() passes to sys.exit with sys.argv = argv: sys.exit("error: ...") is what prints
    one line on stderr and exits 1. Give argv a small budget, so that a check that is missing
    cannot start a long run before the test fails."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


def error_line(module, capsys, run) -> str:
    """The line a script prints on stderr when run() ends in an error: its one_line_errors (what `python
    script.py` runs main() under) turns a sys.exit or a FloatingPointError into one line and exit status 1."""
    with pytest.raises(SystemExit) as exited, module.one_line_errors():
        run()
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == 1 and len(lines) == 1, lines
    return lines[0]


def assert_one_error_line_before_any_work(message, names: str, capsys, out_dir: Path) -> None:
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message and names in message
    assert capsys.readouterr().err == "" and not out_dir.exists()
