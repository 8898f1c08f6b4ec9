"""REINFORCE with a baseline, on a causal language model (Williams 1992; Kool et al. 2019).

Sample a response, score it, and push up the log-probability of every token of it in
proportion to how much better than expected the score was:

    ∇J(θ) = E_{y ~ π_θ} [ (R(y) − b) · Σ_t ∇ log π_θ(y_t | x, y_<t) ]

The baseline b may depend on the prompt and on other samples, never on y itself, so it leaves
the expected gradient unchanged and only lowers its variance. With --baseline leave-one-out
(RLOO), b for each of K responses to a prompt is the mean score of the other K − 1.

    python reinforce.py                  # the embedded addition policy, a few minutes on a CPU
    python reinforce.py --help

Self-contained on purpose: copy this file (it needs nothing else from this project) and
replace `reward` below to train on your own task.
"""

import contextlib
import copy
import io
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
hf_logging.disable_progress_bar()  # loading and saving bars would drown the training log


@dataclass
class Args:
    model: str = str(HERE / "checkpoints" / "sft-addition")
    """starting policy: a local folder or a Hugging Face hub name (default: the embedded SFT checkpoint)"""
    seed: int = 1
    """seed for the prompts, the sampling and everything else random"""
    total_episodes: int = 76_800
    """sampled responses to train on"""
    num_prompts: int = 64
    """prompts per iteration"""
    samples_per_prompt: int = 4
    """K responses sampled for each prompt (RLOO needs K >= 2)"""
    baseline: Literal["none", "mean", "leave-one-out"] = "leave-one-out"
    """b in (R − b): none; mean = running mean of past rewards; leave-one-out = mean of the other K − 1"""
    learning_rate: float = 3e-5
    """Adam learning rate"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""
    max_new_tokens: int = 6
    """longest response; one that has not emitted EOS by then is cut off and scores 0"""
    temperature: float = 1.0
    """sampling temperature, used identically when computing log-probs"""
    kl_coef: float = 0.0
    """β: subtract β·Σ_t (log π_θ − log π_ref) from each response's reward (0 = no reference model)"""
    micro_batch_size: int = 256
    """responses per forward/backward pass; gradients accumulate over micro-batches"""
    eval_every: int = 12_800
    """episodes between evaluations (one also runs before the first update and after the last)"""
    output_dir: Path | None = None
    """where metrics.jsonl, args.json and model/ go (default: runs/reinforce-<seed>-<time>)"""
    device: str = "auto"
    """auto = cuda when available, else cpu"""


def parse_args() -> Args:
    """tyro's parser, with its boxed error messages cut down to one line on stderr."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = tyro.cli(Args)
    except SystemExit as e:
        if not e.code:
            raise  # --help
        body = []
        for line in err.getvalue().splitlines()[1:]:
            if line.strip("│ ").startswith("─"):
                break
            body.append(line.strip("│ "))
        sys.exit("error: " + " ".join(body))
    problems = [
        (args.total_episodes < 1, "--total-episodes must be >= 1"),
        (args.num_prompts < 1, "--num-prompts must be >= 1"),
        (args.samples_per_prompt < 1, "--samples-per-prompt must be >= 1"),
        (args.baseline == "leave-one-out" and args.samples_per_prompt < 2,
         "--baseline leave-one-out needs --samples-per-prompt >= 2"),
        (not args.learning_rate > 0, "--learning-rate must be > 0"),
        (not args.max_grad_norm > 0, "--max-grad-norm must be > 0"),
        (args.max_new_tokens < 1, "--max-new-tokens must be >= 1"),
        (not args.temperature > 0, "--temperature must be > 0"),
        (not args.kl_coef >= 0, "--kl-coef must be >= 0"),
        (args.micro_batch_size < 1, "--micro-batch-size must be >= 1"),
        (args.eval_every < 1, "--eval-every must be >= 1"),
        (args.device not in ("auto", "cpu") and not args.device.startswith("cuda"), "--device must be auto, cpu or cuda[:N]"),
        (args.device.startswith("cuda") and not torch.cuda.is_available(), f"--device {args.device}: no CUDA device here"),
    ]
    for bad, message in problems:
        if bad:
            sys.exit(f"error: {message}")
    return args


# ---- The task: two-digit addition. `reward` is the one piece to replace for your own task. ----
def reward(prompt: str, completion: str, finished: bool) -> float:
    """1.0 when the completion, up to its first EOS, is exactly the sum; else 0.0.
    `finished` is False when the response was cut off before EOS."""
    a, b = prompt.removesuffix("=").split("+")
    return float(finished and completion == str(int(a) + int(b)))


EVAL_SEED = 1234  # fixed forever, independent of --seed, so every run scores the same 500 pairs
ALL_PAIRS = [(a, b) for a in range(100) for b in range(100)]
EVAL_PAIRS = random.Random(EVAL_SEED).sample(ALL_PAIRS, 500)
TRAIN_PAIRS = sorted(set(ALL_PAIRS) - set(EVAL_PAIRS))  # every training prompt, SFT and RL alike


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


# ---- Model, sampling and log-probs ----
def load_policy(name: str, device: torch.device):
    """Any causal LM and its tokenizer. Tokenizers without a pad token reuse EOS for padding:
    padding is tracked by masks, never by token id."""
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load --model {name}: {str(e).splitlines()[0]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()  # dropout off, for good: sampling, scoring and training see one deterministic policy
    return model, tok


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def sample(model, tok, prompts: list[str], max_new_tokens: int, temperature: float, greedy: bool = False,
           generator: torch.Generator | None = None):
    """Left-padded batch sampling with a KV cache. Returns the token ids [B, P+T], the attention
    mask [B, P+T], the prompt width P and the response mask [B, T]: 1 on every generated token up
    to and including EOS, 0 after it. The attention mask is exactly the one training uses."""
    device = model.device
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    step_ids, step_pos, cache = ids, positions(attn), None
    alive = torch.ones(len(prompts), dtype=torch.bool, device=device)
    tokens, response_mask = [], []
    for _ in range(max_new_tokens):
        with autocast(device):
            out = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, cache=cache, use_cache=True,
                        logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        nxt = torch.where(alive, nxt, tok.pad_token_id)
        tokens.append(nxt)
        response_mask.append(alive.clone())  # this token counts, EOS included
        attn = torch.cat([attn, alive.long()[:, None]], 1)
        alive &= nxt != tok.eos_token_id
        if not alive.any():
            break
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
    return torch.cat([ids, torch.stack(tokens, 1)], 1), attn, ids.shape[1], torch.stack(response_mask, 1)


def decode(tok, ids: torch.Tensor, response_mask: torch.Tensor):
    """Completion texts up to (not including) EOS, and whether each one finished with EOS."""
    lengths = response_mask.sum(1).tolist()
    finished = [n > 0 and row[n - 1] == tok.eos_token_id for row, n in zip(ids.tolist(), lengths)]
    texts = [tok.decode(row[: n - int(f)], skip_special_tokens=True) for row, n, f in zip(ids.tolist(), lengths, finished)]
    return texts, finished


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float):
    """log π_θ(a_t | s_t) of each response token, [B, T], and the entropy of π_θ(· | s_t), from one
    forward pass with the sampler's attention mask, position ids and temperature."""
    with autocast(ids.device):
        # Logits only where they predict a response token: with a large vocabulary, the prompt's
        # logits would be the largest tensor of the step.
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn),
                       logits_to_keep=ids.shape[1] - n_prompt + 1).logits
    logits = logits[:, :-1]  # the logit at t predicts token t + 1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32, fp64 stays
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def leave_one_out(scores: torch.Tensor) -> torch.Tensor:
    """RLOO baseline for scores [P, K]: for each response, the mean score of the other K − 1."""
    k = scores.shape[1]
    return (scores.sum(1, keepdim=True) - scores) / (k - 1)


def reinforce_loss(logp: torch.Tensor, response_mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient is the REINFORCE estimate −(R − b)·Σ_t ∇ log π_θ(a_t | s_t).
    Tokens are summed within a response and responses averaged: the sum is the log-probability
    of the whole response, the action the reward scores, so the estimate stays unbiased. Averaging
    over tokens instead would favour short responses."""
    seq_logp = torch.where(response_mask, logp, 0.0).sum(1)
    return -(advantages.detach() * seq_logp).mean()


# ---- Evaluation and saving ----
@torch.no_grad()
def evaluate(model, tok, args: Args) -> dict:
    """Greedy exact-match accuracy and mean sampled reward on the fixed 500 evaluation pairs.
    The sampled half draws from its own fixed generator, so evaluating leaves training unchanged."""
    prompts = [prompt_of(a, b) for a, b in EVAL_PAIRS]
    gen = torch.Generator(model.device).manual_seed(EVAL_SEED)
    result = {}
    for key, greedy in (("eval_accuracy", True), ("eval_reward_sampled", False)):
        scores = []
        for i in range(0, len(prompts), args.micro_batch_size):
            chunk = prompts[i : i + args.micro_batch_size]
            ids, _, n_prompt, mask = sample(model, tok, chunk, args.max_new_tokens, args.temperature, greedy, gen)
            texts, finished = decode(tok, ids[:, n_prompt:], mask)
            scores += [reward(p, c, f) for p, c, f in zip(chunk, texts, finished)]
        result[key] = sum(scores) / len(scores)
    return result


def save(model, tok, path: Path) -> None:
    """Write to a temporary folder first, so an interrupted save never destroys the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# ---- Training ----
def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out_dir = args.output_dir or Path("runs") / f"reinforce-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tok = load_policy(args.model, device)
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.kl_coef > 0 else None  # π_ref, frozen
    batch_size = args.num_prompts * args.samples_per_prompt
    num_iterations = math.ceil(args.total_episodes / batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "args.json").write_text(json.dumps(asdict(args), default=str, indent=2))
    print(f"reinforce: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}\n"
          f"  {num_iterations} iterations x {batch_size} episodes ({args.num_prompts} prompts x "
          f"{args.samples_per_prompt} samples), baseline {args.baseline}, kl_coef {args.kl_coef} -> {out_dir}")

    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, fused=True)  # one kernel for all parameters
    rng = random.Random(args.seed)
    running_mean, episodes, next_eval = None, 0, 0
    start = last_print = time.time()
    metrics_file = open(out_dir / "metrics.jsonl", "w")
    first_eval = last_eval = evaluate(model, tok, args)
    save(model, tok, out_dir / "model")  # so a run that stops early always leaves a model behind
    next_eval += args.eval_every
    # Row 0 is the starting policy; its reward_mean is that of the evaluation's sampled responses.
    metrics_file.write(json.dumps({"iteration": 0, "episodes": 0, "seconds": 0.0,
                                   "reward_mean": first_eval["eval_reward_sampled"], **first_eval}) + "\n")
    for iteration in range(1, num_iterations + 1):
        # 1. Sample K responses for each of P prompts, and score them.
        pairs = [rng.choice(TRAIN_PAIRS) for _ in range(args.num_prompts)]
        prompts = [prompt_of(a, b) for a, b in pairs for _ in range(args.samples_per_prompt)]
        ids, attn, n_prompt, response_mask = sample(model, tok, prompts, args.max_new_tokens, args.temperature)
        texts, finished = decode(tok, ids[:, n_prompt:], response_mask)
        scores = torch.tensor([reward(p, c, f) for p, c, f in zip(prompts, texts, finished)], device=device)

        # 2. R = score − β·Σ_t (log π_θ − log π_ref): the KL penalty is part of the reward, so
        #    it is scaled by the same advantage as the score.
        with torch.no_grad():
            logp_old, entropy = token_logprobs(model, ids, attn, n_prompt, args.temperature)
            kl = torch.zeros_like(scores)
            if ref_model is not None:
                logp_ref, _ = token_logprobs(ref_model, ids, attn, n_prompt, args.temperature)
                kl = torch.where(response_mask, logp_old - logp_ref, 0.0).sum(1)
        rewards = scores - args.kl_coef * kl

        # 3. Advantage A = R − b, with b independent of the response it scales.
        if args.baseline == "leave-one-out":
            baseline = leave_one_out(rewards.view(args.num_prompts, -1)).flatten()
        elif args.baseline == "mean":  # the mean of earlier batches only, so b never sees this R
            baseline = torch.full_like(rewards, running_mean if running_mean is not None else 0.0)
            batch_mean = rewards.mean().item()
            running_mean = batch_mean if running_mean is None else 0.9 * running_mean + 0.1 * batch_mean
        else:
            baseline = torch.zeros_like(rewards)
        advantages = rewards - baseline

        # 4. One gradient step on −mean_i A_i·Σ_t log π_θ, accumulated over micro-batches.
        optimizer.zero_grad(set_to_none=True)
        for mb in torch.arange(len(prompts), device=device).split(args.micro_batch_size):
            logp, _ = token_logprobs(model, ids[mb], attn[mb], n_prompt, args.temperature)
            loss = reinforce_loss(logp, response_mask[mb], advantages[mb]) * len(mb) / len(prompts)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            sys.exit(f"error: non-finite gradient at iteration {iteration}; the last saved model is in {out_dir / 'model'}")
        optimizer.step()

        episodes += len(prompts)
        n_tokens = response_mask.sum()
        row = {
            "iteration": iteration, "episodes": episodes, "seconds": round(time.time() - start, 3),
            "reward_mean": rewards.mean().item(), "score_mean": scores.mean().item(),
            "baseline_mean": baseline.mean().item(), "advantage_std": advantages.std().item() if len(prompts) > 1 else 0.0,
            "grad_norm": grad_norm.item(), "kl": kl.mean().item(),
            "response_length": (n_tokens / len(prompts)).item(),
            "entropy": (torch.where(response_mask, entropy, 0.0).sum() / n_tokens).item(),
        }
        if episodes >= next_eval or iteration == num_iterations:
            last_eval = evaluate(model, tok, args)
            row.update(last_eval)
            next_eval += args.eval_every
            save(model, tok, out_dir / "model")
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if time.time() - last_print >= 10 or "eval_accuracy" in row or iteration == 1:
            last_print = time.time()
            print(f"iter {iteration:4d}  episodes {episodes:6d}  reward {row['reward_mean']:.3f}  "
                  f"kl {row['kl']:.3f}  entropy {row['entropy']:.3f}  "
                  f"{episodes / (time.time() - start):.0f} episodes/s"
                  + (f"  eval_accuracy {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else ""))
    seconds = time.time() - start
    print(f"reinforce: eval_accuracy {first_eval['eval_accuracy']:.3f} -> {last_eval['eval_accuracy']:.3f} in "
          f"{seconds:.0f}s, {episodes / seconds:.0f} episodes/s; model saved to {out_dir / 'model'}")


if __name__ == "__main__":
    main()
