"""Small things the tests share: tiny Hugging Face models built from a config, and an
autoregressive policy small enough to enumerate every response it can produce."""

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "sft-addition"


def tiny_model(path: Path, arch: str = "gpt2", pad_token: bool = True, padding_side: str = "right",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer model of `arch` (gpt2, llama or neox) with the embedded
    character tokenizer at `path`. pad_token=False removes the pad token, as Llama's tokenizer has none;
    the default right padding side checks that the scripts pad prompts on the left themselves."""
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    if not pad_token:
        tok.pad_token = None
    tok.padding_side = padding_side
    common = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    config = {
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **common),
        "neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32, **common),
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
    """π_θ(a | s) = softmax(θ[s]) with one row of logits per prefix s. It takes the keyword
    arguments of a Hugging Face causal LM and returns .logits [B, L, VOCAB] (and .hidden_states, a
    one-hot of the prefix, so a linear value head on it is a tabular critic), so the scripts' own
    functions run on it unchanged."""

    def __init__(self, theta: torch.Tensor | None = None, max_len: int = MAX_LEN):
        super().__init__()
        self.index = {p: i for i, p in enumerate(prefixes(max_len))}
        if theta is None:
            theta = torch.zeros(len(self.index), VOCAB, dtype=torch.float64)
        self.theta = torch.nn.Parameter(theta)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **kwargs):
        rows = []
        for seq in input_ids.tolist():
            response = seq[1:]
            # Prefixes that run past EOS into padding are not states; row 0 stands in (masked anyway).
            rows.append([self.index.get(tuple(response[:t]), 0) for t in range(len(seq))])
        rows = torch.tensor(rows)
        one_hot = torch.nn.functional.one_hot(rows, len(self.index)).to(self.theta.dtype)
        logits = self.theta[rows][:, -logits_to_keep:]  # like Hugging Face: the last logits_to_keep (0: all)
        return SimpleNamespace(logits=logits, hidden_states=(one_hot,))

    def prob(self, response: tuple[int, ...]) -> torch.Tensor:
        """π_θ(y) = Π_t π_θ(y_t | y_<t), differentiable in θ."""
        logp = torch.log_softmax(self.theta, -1)
        return torch.exp(sum(logp[self.index[response[:t]], a] for t, a in enumerate(response)))


# ---- Running a script end to end ----
def run_script(script: str | Path, *flags: str, out_dir: Path | None = None, cwd: Path | None = None,
               check: bool = True):
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
    rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics and metrics.exists() else []
    return proc, rows


# ---- Bad input, in process: faster than a subprocess ----
def exit_message(monkeypatch, main, argv: list[str]) -> str:
    """What main() passes to sys.exit with sys.argv = argv: sys.exit("error: ...") is what prints
    one line on stderr and exits 1. Give argv a small budget, so that a check that is missing
    cannot start a long run before the test fails."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


def assert_one_error_line_before_any_work(message, names: str, capsys, out_dir: Path) -> None:
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message and names in message
    assert capsys.readouterr().err == "" and not out_dir.exists()
