"""REINFORCE with a baseline, on a causal language model (Williams 1992; Kool et al. 2019).

Sample a response, score it, and push up the log-probability of every token of it in
proportion to how much better than expected the score was:

    ∇J(θ) = E_{y ~ π_θ} [ (R(y) − b) · Σ_t ∇ log π_θ(y_t | x, y_<t) ]

The baseline b may depend on the prompt and on other samples, never on y itself, so it leaves
the expected gradient unchanged and only lowers its variance. With --baseline leave-one-out
(RLOO), b for each of K responses to a prompt is the mean score of the other K − 1.

    python reinforce.py                              # the embedded addition policy, a minute on a CPU
    torchrun --nproc-per-node 8 reinforce.py ...     # the same algorithm, data-parallel over 8 GPUs
    python reinforce.py --resume runs/reinforce-...  # continue an interrupted run from its last save
    python reinforce.py --help

Self-contained on purpose: copy this file (it needs nothing else from this project) and
replace `reward` below to train on your own task.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
import tyro
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
hf_logging.disable_progress_bar()  # loading and saving bars would drown the training log


@dataclass
class Args:
    model: str = str(HERE / "checkpoints" / "sft-addition")
    """starting policy: a local folder or a Hugging Face hub name (default: the embedded SFT checkpoint)"""
    seed: int = 1
    """seed for the prompts, the sampling and everything else random (process k of torchrun adds k)"""
    total_episodes: int = 76_800
    """sampled responses to train on"""
    num_prompts: int = 64
    """prompts per iteration, over all processes"""
    samples_per_prompt: int = 4
    """K responses sampled for each prompt (RLOO needs K >= 2)"""
    baseline: Literal["none", "mean", "leave-one-out"] = "leave-one-out"
    """b in (R − b): none; mean = running mean of past rewards; leave-one-out = mean of the other K − 1"""
    learning_rate: float = 3e-5
    """Adam learning rate"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""
    max_new_tokens: int = 6
    """longest response; one that has not emitted a stop token by then is cut off and scores 0"""
    temperature: float = 1.0
    """sampling temperature, used identically when computing log-probs"""
    kl_coef: float = 0.0
    """β: subtract β·Σ_t (log π_θ − log π_ref) from each response's reward (0 = no reference model)"""
    micro_batch_size: int = 64
    """responses per forward/backward pass of the update; gradients accumulate over micro-batches"""
    inference_batch_size: int = 256
    """responses per pass without gradients: sampling, π_old, π_ref, evaluation"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: far less memory, about a third more time"""
    eval_every: int = 12_800
    """episodes between evaluations and saves (one also runs before the first update and after the last)"""
    output_dir: str | None = None
    """where metrics.jsonl, args.json and model/ go (default: runs/reinforce-<seed>-<time>)"""
    resume: str | None = None
    """continue the run saved in this folder, with its own arguments (give no other flag)"""
    device: str = "auto"
    """auto = cuda when available, else cpu"""


def cli_error(argv: list[str]) -> str:
    """Why tyro rejected argv, in one line: each flag is parsed again on its own, and the first that
    fails is named. (Reading tyro's message instead would depend on how it draws its box.)"""
    fields = {"--" + f.name.replace("_", "-"): f for f in dataclasses.fields(Args)}
    groups = []
    for token in argv:
        if token.startswith("--"):
            groups.append(token.split("=", 1))
        elif not groups:
            return f"unexpected argument {token!r}"
        else:
            groups[-1].append(token)
    for flag, *values in groups:
        field = fields.get(flag) or fields.get(flag.replace("--no-", "--", 1))
        if field is None:
            return f"unrecognized flag {flag}"
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                tyro.cli(Args, args=[flag, *values])
        except SystemExit:
            if field.type is bool:
                return f"{flag} takes no value"
            kinds = get_args(field.type) or (field.type,)
            expected = ("one of " if get_origin(field.type) is Literal else "") + ", ".join(
                "None" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds
            )
            return f"{flag} expects {expected}, got {' '.join(values)!r}" if values else f"{flag} needs a value"
    return "cannot parse " + " ".join(argv)


def parse_args() -> Args:
    """The command line, checked: bad input ends the run here with one line on stderr."""
    argv = sys.argv[1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tyro's own message: a box drawn for a terminal
            args = tyro.cli(Args, args=argv)
    except SystemExit as e:
        if e.code == 0:
            raise  # --help, printed on stdout
        sys.exit(f"error: {cli_error(argv)}")
    if args.resume is not None:
        saved = Path(args.resume) / "model" / "training_state.pt"
        if args != Args(resume=args.resume):
            sys.exit("error: --resume continues a run with its own arguments: give no other flag")
        old = saved.parent.with_name("model.old")
        if not saved.parent.exists() and old.exists():  # a save stopped between its two renames left the last here
            with contextlib.suppress(FileNotFoundError):  # another process of the run may have moved it back first
                old.rename(saved.parent)
        if not saved.exists():
            sys.exit(f"error: --resume {args.resume}: no {saved.relative_to(args.resume)} to continue from")
        args = Args(**{**json.loads((Path(args.resume) / "args.json").read_text()), "resume": args.resume})
        args.output_dir = args.resume
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    problems = [
        (args.total_episodes < 1, "--total-episodes must be >= 1"),
        (args.num_prompts < 1, "--num-prompts must be >= 1"),
        (args.num_prompts % world != 0, f"--num-prompts {args.num_prompts} must split over {world} processes"),
        (args.samples_per_prompt < 1, "--samples-per-prompt must be >= 1"),
        (
            args.baseline == "leave-one-out" and args.samples_per_prompt < 2,
            "--baseline leave-one-out needs --samples-per-prompt >= 2",
        ),
        (not args.learning_rate > 0, "--learning-rate must be > 0"),
        (not args.max_grad_norm > 0, "--max-grad-norm must be > 0"),
        (args.max_new_tokens < 1, "--max-new-tokens must be >= 1"),
        (not args.temperature > 0, "--temperature must be > 0"),
        (not args.kl_coef >= 0, "--kl-coef must be >= 0"),
        (args.micro_batch_size < 1, "--micro-batch-size must be >= 1"),
        (args.inference_batch_size < 1, "--inference-batch-size must be >= 1"),
        (args.eval_every < 1, "--eval-every must be >= 1"),
        (
            args.device not in ("auto", "cpu") and not args.device.startswith("cuda"),
            "--device must be auto, cpu or cuda",
        ),
        (args.device.startswith("cuda") and not torch.cuda.is_available(), f"--device {args.device}: no CUDA here"),
    ]
    for bad, message in problems:
        if bad:
            sys.exit(f"error: {message}")
    return args


# ---- The task: two-digit addition. `reward` is the one piece to replace for your own task. ----
def reward(prompt: str, completion: str, finished: bool) -> float:
    """1.0 when the completion, as sampled up to its stop token, is exactly the sum; else 0.0.
    `finished` is False when the response was cut off before a stop token."""
    a, b = prompt.removesuffix("=").split("+")
    return float(finished and completion == str(int(a) + int(b)))


EVAL_SEED = 1234  # fixed forever, independent of --seed, so every run scores the same 500 pairs
ALL_PAIRS = [(a, b) for a in range(100) for b in range(100)]
EVAL_PAIRS = random.Random(EVAL_SEED).sample(ALL_PAIRS, 500)
TRAIN_PAIRS = sorted(set(ALL_PAIRS) - set(EVAL_PAIRS))  # every training prompt, SFT and RL alike


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


# ---- Model, sampling and log-probs ----
def load_policy(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """Any causal LM and its tokenizer. Dropout is switched off in the config, so training mode
    (which gradient checkpointing needs) computes the same policy that sampled. Every stop token
    (the tokenizer's EOS and those of the generation config) ends up in generation_config.eos_token_id.
    Tokenizers without a pad token reuse EOS for padding: padding is tracked by masks, never by id."""
    try:
        config = AutoConfig.from_pretrained(name)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load {name}: {str(e).splitlines()[0]}")
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype).to(device).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):  # one a config does not name
            module.p = 0.0
    eos = model.generation_config.eos_token_id
    stops = sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    if not stops:
        sys.exit(f"error: {name} has no EOS token: a response could never end")
    model.generation_config.eos_token_id = stops
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Log-probs are computed from the LM head applied to the last hidden state (see forward); a model
    # that changes its logits after the head (soft-capping, scaling) would be trained on the wrong ones.
    with torch.no_grad():
        probe = torch.tensor([stops[:1] * 2], device=device)
        direct = model(input_ids=probe).logits[0, -1].float()
        rebuilt = model.get_output_embeddings()(model.base_model(input_ids=probe).last_hidden_state[0, -1]).float()
    if not torch.allclose(direct, rebuilt, rtol=1e-3, atol=1e-3):
        sys.exit(f"error: {name} transforms its logits after the LM head, which this script does not support")
    return model, tok


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per row, index i with probability w_i / Σ_j w_j: the first i with c_i ≥ u, c the cumulative
    sum (float64) and u uniform on (0, c_last]. An entry of weight 0 is never chosen."""
    c = weights.double().cumsum(-1)
    u = (1 - torch.rand(len(c), 1, dtype=c.dtype, device=c.device, generator=generator)) * c[:, -1:]
    return torch.searchsorted(c, u).squeeze(-1)


def sample_token(logits: torch.Tensor, temperature: float, generator=None, block: int = 1024) -> torch.Tensor:
    """One token per row of logits [B, V] from softmax(logits / T), exactly, and overwriting logits to
    save a copy. The CDF is inverted in two stages, a block of `block` tokens by the blocks' mass, then
    a token within it: two random numbers per row. torch.multinomial draws one per vocabulary entry,
    ten times the cost of the forward pass at 150,000 tokens on a CPU; and one float32 cumulative sum
    over the vocabulary would round tokens lighter than 6e-8 of the mass to probability 0."""
    p = logits.div_(temperature)
    p = p.sub_(p.amax(-1, keepdim=True)).exp_()  # softmax without its normaliser, which cancels
    n, vocab = p.shape
    block = min(block, vocab)
    full = vocab - vocab % block  # the last block may be short
    mass = torch.cat([p[:, :full].view(n, -1, block).sum(-1), p[:, full:].sum(-1, keepdim=True)], 1)
    columns = inverse_cdf(mass, generator)[:, None] * block + torch.arange(block, device=p.device)
    within = torch.where(columns < vocab, p.gather(1, columns.clamp(max=vocab - 1)), 0.0)
    return columns.gather(1, inverse_cdf(within, generator)[:, None]).squeeze(-1)


@torch.no_grad()
def sample(model, tok, prompts: list[str], max_new_tokens: int, temperature: float, batch_size: int, greedy=False,
           generator=None):  # fmt: skip
    """Left-padded sampling with a KV cache, batch_size prompts at a time. Returns the token ids
    [B, P+T], the attention mask [B, P+T] (exactly the one training uses), the prompt width P, the
    response mask [B, T] (1 on every generated token up to and including the first stop token, 0
    after it) and whether each response ended on a stop token [B] (False: it was cut off). The stop
    tokens are generation_config.eos_token_id, where load_policy put the tokenizer's EOS too."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    prompt_ids, prompt_attn = enc["input_ids"], enc["attention_mask"]
    stops = torch.tensor(model.generation_config.eos_token_id, device=model.device)
    responses = []
    for ids, attn in zip(prompt_ids.split(batch_size), prompt_attn.split(batch_size)):
        pos, cache, tokens = positions(attn), None, []
        alive = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            step = dict(input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True)
            with autocast(ids.device):
                out = model(**step, logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1].float()
            next_token = logits.argmax(-1) if greedy else sample_token(logits, temperature, generator)
            tokens.append(torch.where(alive, next_token, tok.pad_token_id))
            attn = torch.cat([attn, alive.long()[:, None]], 1)
            alive &= ~torch.isin(next_token, stops)
            if not alive.any():
                break
            ids, pos = next_token[:, None], pos[:, -1:] + 1
        responses.append(torch.stack(tokens, 1))
    width = max(r.shape[1] for r in responses)
    response = torch.cat(
        [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=tok.pad_token_id) for r in responses]
    )
    stopped = torch.isin(response, stops)
    mask = stopped.cumsum(1) - stopped.long() == 0  # no stop token before t
    ids, attn = torch.cat([prompt_ids, response], 1), torch.cat([prompt_attn, mask.long()], 1)
    return ids, attn, prompt_ids.shape[1], mask, stopped.any(1)


def decode(tok, response_ids: torch.Tensor, response_mask: torch.Tensor, finished: torch.Tensor) -> list[str]:
    """Each completion as sampled, without the stop token that ended it. Special tokens stay: a pad
    or BOS inside a response is part of what the reward judges, never dropped for free."""
    lengths = (response_mask.sum(1) - finished.long()).tolist()
    return [tok.decode(row[:n], skip_special_tokens=False) for row, n in zip(response_ids.tolist(), lengths)]


LOGITS_PER_CHUNK = 2**25  # 128 MiB in float32: the most of the LM head's output that exists at once


def logprob_chunk(lm_head, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool):
    z = lm_head(hidden)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature  # bf16 -> fp32, fp64 stays
    log_normaliser = z.logsumexp(-1)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - log_normaliser  # log π(a|s) = z_a/T − logsumexp(z/T)
    if not entropy:
        return logp, torch.empty(0)
    with torch.no_grad():  # the entropy is only logged
        return logp, log_normaliser - (z.softmax(-1) * z).sum(-1)  # H = logsumexp(z/T) − E_π[z/T]


def response_logprobs(lm_head, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool):
    """log π(a | s) of each token a [N] after each hidden state h(s) [N, H] and, if asked, the entropy of
    π(· | s) [N], without gradient (else None). Rows go through the LM head in chunks, so no [N, V] tensor
    exists at once; with gradients each chunk is recomputed in the backward pass (checkpointed), so none
    is kept for it either: with V = 150,000 a float32 [N, V] takes 0.6 MB per token. The entropy is
    elementwise work over [N, V] (with a large vocabulary on a CPU, a third of a forward and backward):
    ask for it where it is logged."""
    rows = max(1, LOGITS_PER_CHUNK // lm_head.weight.shape[0])
    chunks = [
        checkpoint(logprob_chunk, lm_head, h, a, temperature, entropy, use_reentrant=False)
        if torch.is_grad_enabled()
        else logprob_chunk(lm_head, h, a, temperature, entropy)
        for h, a in zip(hidden.split(rows), tokens.split(rows))
    ]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]) if entropy else None


def token_logprobs(model, ids, attn, n_prompt: int, temperature: float, entropy: bool = False):
    """log π_θ(a_t | s_t) of each response token and, if asked, the entropy of π_θ(· | s_t) (no gradient:
    it is only logged; else None), each [B, T] and 0 on padding, from one forward pass with the sampler's
    attention mask, position ids and temperature."""
    mask = attn[:, n_prompt:].bool()  # the response mask
    with autocast(ids.device):
        out = model.base_model(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False)
        hidden = out.last_hidden_state[:, n_prompt - 1 : -1]  # h(s_t), which predicts a_t
        lm_head, tokens = model.get_output_embeddings(), ids[:, n_prompt:]
        logp, entropy = response_logprobs(lm_head, hidden[mask], tokens[mask], temperature, entropy)
    unpack = lambda x: None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
    return unpack(logp), unpack(entropy)


# ---- REINFORCE ----
def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ of x over every process (x itself without torch.distributed): batch statistics are global."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


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


def update(model, optimizer, batch: dict, n_prompt: int, args: Args) -> torch.Tensor:
    """One gradient step on reinforce_loss over this process's responses, summed over micro-batches
    (each weighted by its share of the responses); DistributedDataParallel averages it over the
    processes, which hold as many responses each. Returns the gradient norm; the step is taken only
    if it is finite."""
    n = len(batch["mask"])
    micro = [slice(i, i + args.micro_batch_size) for i in range(0, n, args.micro_batch_size)]
    optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1 or not isinstance(model, DistributedDataParallel)  # average once, at the end
        with contextlib.nullcontext() if sync else model.no_sync():
            logp, _ = model(batch["ids"][mb], batch["attn"][mb], n_prompt, args.temperature)
            loss = reinforce_loss(logp, batch["mask"][mb], batch["advantages"][mb])
            (loss * len(batch["mask"][mb]) / n).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    return grad_norm


class PolicyLogProbs(torch.nn.Module):
    """π_θ as a module whose forward is token_logprobs: what DistributedDataParallel wraps."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, ids, attn, n_prompt: int, temperature: float):
        return token_logprobs(self.policy, ids, attn, n_prompt, temperature)


# ---- Evaluation and saving ----
@torch.no_grad()
def evaluate(model, tok, args: Args) -> dict:
    """Greedy exact-match accuracy and mean sampled reward on the fixed 500 evaluation pairs.
    The sampled half draws from its own fixed generator, so evaluating leaves training unchanged."""
    prompts = [prompt_of(a, b) for a, b in EVAL_PAIRS]
    result = {}
    for key, greedy in (("eval_accuracy", True), ("eval_reward_sampled", False)):
        gen = torch.Generator(model.device).manual_seed(EVAL_SEED)
        size = args.inference_batch_size
        ids, _, n_prompt, mask, finished = sample(model, tok, prompts, args.max_new_tokens, args.temperature, size,
                                                  greedy, gen)  # fmt: skip
        texts = decode(tok, ids[:, n_prompt:], mask, finished)
        result[key] = sum(map(reward, prompts, texts, finished.tolist())) / len(prompts)
    return result


def save(model, tok, path: Path, state: dict) -> None:
    """The policy (loadable with from_pretrained) and, beside it, what --resume needs. Written to a
    temporary folder first, so an interrupted save never destroys the previous one."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save(state, tmp / "training_state.pt")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---- Training ----
def main() -> None:
    args = parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
    if cuda and world > 1:  # one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if world > 1:  # one process per GPU (NCCL), or per share of the CPU (gloo)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    out_dir = Path(args.output_dir or f"runs/reinforce-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.manual_seed(args.seed + rank)  # each process samples its own responses
    policy, tok = load_policy(str(out_dir / "model") if args.resume else args.model, device)  # π_θ
    ref_model = None
    if args.kl_coef > 0:  # π_ref, frozen: in bf16 on a GPU, where autocast computes in bf16 anyway
        ref_model = load_policy(args.model, device, torch.bfloat16 if cuda else torch.float32)[0].requires_grad_(False)
    if args.gradient_checkpointing:  # non-reentrant: the recompute runs in the backward pass
        policy.activation_checkpointing_enable()
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)  # one kernel for all
    local_prompts = args.num_prompts // world
    batch_size = args.num_prompts * args.samples_per_prompt
    num_iterations = math.ceil(args.total_episodes / batch_size)
    rng = random.Random(args.seed + rank)
    running_mean, done, seconds = None, -1, 0.0  # the mean baseline, the last iteration done (none), its time
    if args.resume:  # the state of the last save
        state = torch.load(out_dir / "model" / "training_state.pt", weights_only=True)
        if len(state["rng"]) != world:
            sys.exit(f"error: --resume: the run had {len(state['rng'])} processes, not {world}")
        running_mean, done, seconds = state["running_mean"], state["iteration"], state["seconds"]
        optimizer.load_state_dict(state["optimizer"])
        python_rng, torch_rng, cuda_rng = state["rng"][rank]
        rng.setstate(python_rng)
        torch.set_rng_state(torch_rng)
        if cuda:
            torch.cuda.set_rng_state(cuda_rng, device)
    model = PolicyLogProbs(policy)
    trainable = DistributedDataParallel(model) if world > 1 else model  # averages gradients over processes
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        rows = (out_dir / "metrics.jsonl").read_text().splitlines() if args.resume else []
        metrics_file = open(out_dir / "metrics.jsonl", "w")  # rows after the last save will be done again
        metrics_file.writelines(row + "\n" for row in rows if json.loads(row)["iteration"] <= done)
        print(
            f"reinforce: {args.model} ({sum(p.numel() for p in policy.parameters()):,} parameters), "
            f"{world} x {device}\n"
            f"  {num_iterations} iterations x {batch_size} episodes ({args.num_prompts} prompts x "
            f"{args.samples_per_prompt} samples), baseline {args.baseline}, kl_coef {args.kl_coef}"
            + (f", resumed after iteration {done}" if args.resume else "")
            + f" -> {out_dir}"
        )

    start = last_print = time.time() - seconds
    # Iteration 0 measures the starting policy as every later iteration measures its own, and does not update.
    for iteration in range(done + 1, num_iterations + 1):
        # 1. Sample K responses for each of P prompts, and score them.
        pairs = [rng.choice(TRAIN_PAIRS) for _ in range(local_prompts)]
        prompts = [prompt_of(a, b) for a, b in pairs for _ in range(args.samples_per_prompt)]
        size = args.inference_batch_size
        ids, attn, n_prompt, mask, finished = sample(policy, tok, prompts, args.max_new_tokens, args.temperature, size)
        texts = decode(tok, ids[:, n_prompt:], mask, finished)
        scores = torch.tensor(list(map(reward, prompts, texts, finished.tolist())), device=device)

        # 2. R = score − β·Σ_t (log π_θ − log π_ref): the KL penalty is part of the reward, so
        #    it is scaled by the same advantage as the score.
        chunks = [slice(i, i + size) for i in range(0, len(prompts), size)]
        with torch.no_grad():
            passes = [token_logprobs(policy, ids[c], attn[c], n_prompt, args.temperature, True) for c in chunks]
            logp, entropy = (torch.cat(x) for x in zip(*passes))
            kl = torch.zeros_like(scores)
            if ref_model is not None:
                logp_ref = torch.cat([token_logprobs(ref_model, ids[c], attn[c], n_prompt, args.temperature)[0]
                                      for c in chunks])  # fmt: skip
                kl = torch.where(mask, logp - logp_ref, 0.0).sum(1)
        rewards = scores - args.kl_coef * kl

        # 3. Advantage A = R − b, with b independent of the response it scales.
        if args.baseline == "leave-one-out":
            baseline = leave_one_out(rewards.view(local_prompts, -1)).flatten()
        elif args.baseline == "mean":  # the mean of earlier batches only, so b never sees this R
            baseline = torch.full_like(rewards, running_mean if running_mean is not None else 0.0)
            batch_mean = (global_sum(rewards.sum()) / batch_size).item()
            running_mean = batch_mean if running_mean is None else 0.9 * running_mean + 0.1 * batch_mean
        else:
            baseline = torch.zeros_like(rewards)
        advantages = rewards - baseline

        # 4. One gradient step on −mean_i A_i·Σ_t log π_θ (none at iteration 0).
        grad_norm = None
        if iteration > 0:
            batch = dict(ids=ids, attn=attn, mask=mask, advantages=advantages)
            trainable.train()  # only gradient checkpointing cares: dropout is off in the config
            grad_norm = update(trainable, optimizer, batch, n_prompt, args)
            trainable.eval()
            if not torch.isfinite(grad_norm):
                sys.exit(f"error: non-finite gradient at iteration {iteration}; the last save is in {out_dir}")

        # 5. Log, evaluate and save (rank 0; the others wait, so a save is never half-written).
        episodes = iteration * batch_size
        mean = lambda x: global_sum(x.sum()) / batch_size
        n_tokens = global_sum(mask.sum())
        row = {
            "iteration": iteration, "episodes": episodes, "seconds": round(time.time() - start, 3),
            "reward_mean": mean(rewards), "score_mean": mean(scores), "baseline_mean": mean(baseline),
            "advantage_std": (mean(advantages**2) - mean(advantages) ** 2).clamp(min=0).sqrt(),
            "kl": mean(kl), "response_length": n_tokens / batch_size,
            "entropy": global_sum(torch.where(mask, entropy, 0.0).sum()) / n_tokens,
        }  # fmt: skip
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        row = {k: v.item() if torch.is_tensor(v) else v for k, v in row.items()}
        evaluation_due = episodes // args.eval_every > (episodes - batch_size) // args.eval_every
        if evaluation_due or iteration in (0, num_iterations):
            rng_state = (rng.getstate(), torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
            rng_states = [rng_state] * world
            if world > 1:
                dist.all_gather_object(rng_states, rng_state)
            if rank == 0:
                row.update(evaluate(policy, tok, args))
                state = dict(iteration=iteration, seconds=row["seconds"], running_mean=running_mean, rng=rng_states,
                             optimizer=optimizer.state_dict())  # fmt: skip
                metrics_file.write(json.dumps(row) + "\n")  # before the save: a resume redoes what follows it
                metrics_file.flush()
                save(policy, tok, out_dir / "model", state)
            if world > 1:
                dist.barrier()
        elif rank == 0:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if rank == 0 and (time.time() - last_print >= 10 or "eval_accuracy" in row or iteration == 1):
            last_print = time.time()
            print(
                f"iter {iteration:4d}  episodes {episodes:6d}  reward {row['reward_mean']:.3f}  kl {row['kl']:.3f}  "
                f"entropy {row['entropy']:.3f}  {episodes / (time.time() - start):.0f} episodes/s"
                + (f"  eval_accuracy {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else "")
            )
    if rank == 0:
        rows = (out_dir / "metrics.jsonl").read_text().splitlines()
        first, last = json.loads(rows[0]), json.loads(rows[-1])
        print(
            f"reinforce: eval_accuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f} in "
            f"{last['seconds']:.0f}s, {last['episodes'] / max(last['seconds'], 1e-9):.0f} episodes/s; "
            f"model saved to {out_dir / 'model'}"
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
