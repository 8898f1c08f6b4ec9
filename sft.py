"""Make the tiny starting policy that every RL script loads by default.

A ~0.6M-parameter GPT-2 learns two-digit addition ("12+34=" -> "46<eos>") by supervised
fine-tuning, with a character-level tokenizer over "0123456789+=". Training stops early on
purpose, as soon as greedy accuracy on a validation set reaches --target-accuracy, so that
reinforcement learning has room to improve: the policy already puts some probability on the
right answer (REINFORCE cannot learn from a reward it never sees) but is far from perfect.
Half of the training examples have a one-digit operand ("7+45=", "3+4="), although only 19% of
all pairs do, so that the early stop leaves a policy about as good on every prompt format (see
benchmarks/NOTEBOOK.md: on the natural mix RL stalls near 0.8, on the formats the start had barely learned).

    python sft.py                        # rebuilds checkpoints/sft-addition/ in about a minute

The result is an ordinary Hugging Face folder: AutoModelForCausalLM.from_pretrained(dir) and
AutoTokenizer.from_pretrained(dir) load it like any hub model, offline.

Needs Python >= 3.11, torch >= 2.6 and transformers >= 5 (the RL scripts that load its checkpoint need 5; the
script stops at start, saying so), and tyro. Tested with requirements.txt's pins: torch 2.13, transformers 5.24.
MIT licence (the text is in LICENSE), Copyright (c) 2026 the authors of this repository: copy it, with this notice.
"""

import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
import tyro
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
hf_logging.disable_progress_bar()  # loading and saving bars would drown the training log


@dataclass
class Args:
    output_dir: Path = HERE / "checkpoints" / "sft-addition"
    """where the model and tokenizer are saved (save_pretrained, safetensors)"""
    seed: int = 0
    """seed for initialisation and data order"""
    target_accuracy: float = 0.40
    """stop once greedy validation accuracy reaches this: a deliberately half-trained policy"""
    short_operand_share: float = 0.5
    """share of training examples with a one-digit operand (19% of all pairs have one)"""
    max_steps: int = 4000
    """stop here if the target is never reached"""
    batch_size: int = 128
    """addition examples per step"""
    learning_rate: float = 5e-4
    """AdamW learning rate"""
    eval_every: int = 10
    """steps between validation checks (the stopping rule's resolution)"""
    n_embd: int = 128
    """model width"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 4
    """attention heads"""


# ---- The task: two-digit addition (identical in every script) ----
EVAL_SEED = 1234  # fixed forever, independent of --seed, so every run scores the same 500 pairs
ALL_PAIRS = [(a, b) for a in range(100) for b in range(100)]
EVAL_PAIRS = random.Random(EVAL_SEED).sample(ALL_PAIRS, 500)
TRAIN_PAIRS = sorted(set(ALL_PAIRS) - set(EVAL_PAIRS))  # every training prompt, SFT and RL alike


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus distinct <pad> (id 0) and <eos> (id 1)."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("0123456789+=")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # split into characters
    backend.decoder = decoders.Fuse()  # decode to "46", not "4 6"
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def encode_examples(tok, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded "a+b=" + "sum<eos>" sequences, and labels that score only the answer."""
    rows, labels = [], []
    for a, b in pairs:
        prompt = tok(prompt_of(a, b))["input_ids"]
        answer = tok(str(a + b))["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)  # the prompt is given, not predicted
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return ids, lab


def completion_of(tok, response: list[int]) -> tuple[str, bool]:
    """A response as the RL scripts read it: the text up to its first EOS (not included), special
    tokens kept, and whether it reached an EOS at all."""
    finished = tok.eos_token_id in response
    return tok.decode(response[: response.index(tok.eos_token_id)] if finished else response), finished


@torch.no_grad()
def greedy_accuracy(model, tok, pairs, max_new_tokens: int = 4) -> float:
    """Exact-match rate of greedy answers, by the RL scripts' rule (their `reward`: the completion up
    to EOS is the sum, and EOS came). Prompts are left-padded, with position ids that start at 0 on
    the first real token, as in the RL scripts."""
    enc = tok([prompt_of(a, b) for a, b in pairs], padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    answers = [completion_of(tok, row) for row in ids[:, enc["input_ids"].shape[1] :].tolist()]
    return sum(finished and text == str(a + b) for (text, finished), (a, b) in zip(answers, pairs)) / len(pairs)


def main(args: Args) -> None:
    check_versions()
    if (
        not (0 < args.target_accuracy <= 1 and 0 < args.short_operand_share < 1)
        or min(args.max_steps, args.batch_size) < 1
    ):
        sys.exit(
            "error: need 0 < --target-accuracy <= 1, 0 < --short-operand-share < 1, --max-steps and --batch-size >= 1"
        )
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = make_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok), n_positions=32, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one fused kernel, not eight elementwise ops
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # RL needs a deterministic policy: no dropout
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    print(f"sft: {sum(p.numel() for p in model.parameters()):,} parameters, target accuracy {args.target_accuracy}")

    # A validation set carved out of the training pairs decides when to stop; the evaluation
    # set is never looked at during training.
    pairs = list(TRAIN_PAIRS)
    random.Random(args.seed).shuffle(pairs)
    val_pairs, train_pairs = pairs[:500], pairs[500:]
    ids, labels = encode_examples(tok, train_pairs)
    short = torch.tensor([min(a, b) < 10 for a, b in train_pairs])  # a one-digit operand sits at other positions
    share = args.short_operand_share
    weights = torch.where(short, share / short.sum(), (1 - share) / (~short).sum())
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    start, step, val_acc = time.time(), 0, 0.0
    while step < args.max_steps and val_acc < args.target_accuracy:
        model.train()
        batch = torch.multinomial(weights.double(), args.batch_size, replacement=True)
        out = model(input_ids=ids[batch], attention_mask=(ids[batch] != tok.pad_token_id).long())
        logits = out.logits[:, :-1]  # position t predicts token t + 1
        loss = F.cross_entropy(logits.flatten(0, 1), labels[batch, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            val_acc = greedy_accuracy(model, tok, val_pairs)
            print(f"step {step:5d}  loss {loss.item():.4f}  val_accuracy {val_acc:.3f}  {time.time() - start:.0f}s")

    model.eval()
    eval_acc = greedy_accuracy(model, tok, EVAL_PAIRS)
    model.generation_config.pad_token_id = tok.pad_token_id
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tok.save_pretrained(args.output_dir)
    print(
        f"sft: stopped at step {step}, val_accuracy {val_acc:.3f}, eval_accuracy {eval_acc:.3f}, "
        f"{time.time() - start:.0f}s -> {args.output_dir}"
    )


def check_versions() -> None:
    """Python, torch and transformers new enough for this file, or one error line before any work: under
    transformers 4.x, the names of 5 that these scripts pass (`dtype=`, `cache=`) would fail only mid-run."""
    found = {"Python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__}
    found["transformers"] = transformers.__version__
    for name, least in (("Python", (3, 11)), ("torch", (2, 6)), ("transformers", (5, 0))):
        if tuple(map(int, re.match(r"(\d+)\.(\d+)", found[name]).groups())) < least:
            sys.exit(f"error: {Path(__file__).name} needs {name} >= {least[0]}.{least[1]}; this is {found[name]}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=" ".join(__doc__.split("\n\n")[0].split())))
