"""Train a reward model on preferences between the starting policy's own responses: the middle step of
InstructGPT's loop (Ouyang et al. 2022), SFT (sft.py) -> reward model (this file) -> PPO (ppo.py --reward-model).

Preferences. For a training prompt (never an evaluation one) the starting policy samples two responses, and
the gold preference is the task's own: a right answer (`reward` = 1) beats a wrong one. A pair where both are
right or both are wrong carries no gold preference and is skipped, so the model learns exactly "right beats
wrong"; sampling goes on until --num-pairs pairs with a preference are in hand, or ends with an error once
fewer than 1 sampled pair in 50 has one (a policy almost never, or almost always, right). --label-noise p
flips each training label with probability p, a labeller who errs at that rate; the --eval-pairs held out
keep clean labels, so their pairwise accuracy measures agreement with the gold preference.

The model. A sequence classifier with one output, initialised from the policy's backbone (a new linear `score`
head on its last hidden state), in float32, reading the token ids the policy sampled (the prompt as rendered,
with --chat the conversation, and the response up to and including its stop token) at the last of them, as
ppo.py reads it: reward_model_scores is ppo.py's, copied. It is trained on the Bradley-Terry likelihood
P(y_w ≻ y_l) = σ(r(x, y_w) − r(x, y_l)) of each pair, minimising −log σ(r_w − r_l).

The offset and the scale. Only differences of scores are trained, so their level is arbitrary, and their
spread is whatever the training made it. After training, the score head is divided by the standard deviation
of the scores of fresh samples from the starting policy, at the temperature PPO will sample at
(--calibration-temperature), and their mean is stored in config.reward_offset, which reward_model_scores
subtracts: the starting policy's responses then score mean 0 and standard deviation 1 in PPO, as OpenAI's
lm-human-preferences and the RLHF replications normalise their reward models. PPO's value head starts at 0 and
value clipping lets V move about ε_v = 0.2 from V_old per batch, in raw units: targets far from 0, or spread
over several units, would take the critic many batches to reach. And β, the price of a nat of KL, means the
same thing for every reward model.

    python reward_model.py                                   # the embedded policy, a minute or two on a CPU
    python ppo.py --reward-model runs/reward_model-1-...     # PPO on the learned reward
    python reward_model.py --help

The file, in reading order: Args; the task (the block to replace, the same as in the RL scripts); the reward
model's pieces (preference, flip_labels, bradley_terry_loss, pairwise, calibrate); main(); then, below the
banners, the language-model machinery (copied from ppo.py) and the plumbing.

Needs Python >= 3.11, torch >= 2.6 and transformers >= 5 (4.x lacks the `dtype=` and `cache=` the code passes;
the script stops at start, saying so), and tyro. Tested with requirements.txt's pins: torch 2.13, transformers 5.24.
MIT licence (the text is in LICENSE), Copyright (c) 2026 the authors of this repository: copy it, with this notice.
"""

import contextlib
import dataclasses
import io
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args, get_origin

import torch
import torch.nn.functional as F
import transformers
import tyro
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StaticCache,
)
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
hf_logging.disable_progress_bar()  # loading and saving bars would drown the training log
MAX_SAMPLED_PER_PAIR = 50  # give up when fewer than 1 sampled pair in 50 has a gold preference


@dataclass
class Args:
    model: str = str(HERE / "checkpoints" / "sft-addition")
    """starting policy: a local folder or a Hugging Face hub name"""
    seed: int = 1
    """seed for the prompts, the sampling, the label noise, the new score head and the minibatch order"""
    num_pairs: int = 4096
    """preference pairs to collect (one right and one wrong response to a training prompt), held-out ones included"""
    eval_pairs: int = 512
    """of those, held out with clean labels to measure pairwise accuracy"""
    label_noise: float = 0.0
    """flip the label of each training pair with this probability, as a labeller who errs would"""
    max_new_tokens: int = 6
    """longest response; one that has not emitted a stop token by then is cut off"""
    temperature: float = 1.0
    """sampling temperature of the starting policy for the preference pairs"""
    chat: bool = False
    """give each prompt to the model as a user's message, rendered by its tokenizer's chat template"""
    learning_rate: float = 1e-4
    """Adam learning rate at the first step; it falls linearly, to lr/N at the last of N"""
    epochs: int = 20
    """passes over the training pairs"""
    batch_size: int = 32
    """pairs per Adam step"""
    micro_batch_size: int = 32
    """pairs per forward/backward pass; gradients accumulate over micro-batches"""
    inference_batch_size: int = 256
    """prompts or texts per pass without gradients: sampling, held-out accuracy, calibration"""
    cuda_graphs: bool = True
    """on a GPU, replay each decoding step as a CUDA graph: the same tokens, without a kernel launch per operation"""
    calibration_samples: int = 2048
    """fresh samples of the starting policy whose mean score becomes config.reward_offset"""
    calibration_temperature: float = 0.5
    """their sampling temperature: the --temperature that PPO will sample at, ppo.py's unless you change it"""
    output_dir: str | None = None
    """where the reward model, tokenizer, args.json and metrics.json go (None: runs/reward_model-<seed>-<time>)"""
    overwrite: bool = False
    """replace the reward model in --output-dir, if one is there (else the run refuses to start)"""
    device: str = "auto"
    """auto = cuda when available, else cpu"""


# ==== The task: two-digit addition. Replace this block (the reward and the prompts) for your own task. ====
# The rest of the file reads three names from it, and no other: reward, train_prompts and eval_prompts.
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


def train_prompts(rng: random.Random, n: int) -> list[str]:
    """n training prompts, drawn with replacement."""
    return [prompt_of(*rng.choice(TRAIN_PAIRS)) for _ in range(n)]


def eval_prompts() -> list[str]:
    """The fixed evaluation prompts, never trained on."""
    return [prompt_of(a, b) for a, b in EVAL_PAIRS]


# ==== The reward model: preferences, the Bradley-Terry loss, and the shift. ====
class Response(NamedTuple):
    """A sampled response: what `reward` judges (the task's prompt, the completion as sampled, whether it ended on
    a stop token) and what the reward model reads (ids: the prompt's and the response's token ids as sampled)."""

    prompt: str
    completion: str
    finished: bool
    ids: torch.Tensor

    def gold(self) -> float:
        """The task's own judgement of the response."""
        return reward(self.prompt, self.completion, self.finished)


def preference(first: Response, second: Response) -> tuple | None:
    """The gold preference between two responses to one prompt: (chosen, rejected), the right one chosen;
    None when both are right or both wrong (such a pair is skipped)."""
    r_first, r_second = first.gold(), second.gold()
    if r_first == r_second:
        return None
    return (first, second) if r_first > r_second else (second, first)


def flip_labels(pairs: list, p: float, rng: random.Random) -> list:
    """Each (chosen, rejected) swapped with probability p: one rng.random() per pair, in order."""
    return [(rejected, chosen) if rng.random() < p else (chosen, rejected) for chosen, rejected in pairs]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log P(chosen ≻ rejected) of each pair, P = σ(r_chosen − r_rejected) (Bradley and Terry 1952)."""
    return -F.logsigmoid(chosen - rejected)


@torch.no_grad()
def pairwise(model, chosen: list[torch.Tensor], rejected: list[torch.Tensor], batch_size: int) -> tuple[float, float]:
    """Pairwise accuracy (the share of pairs with r_chosen > r_rejected; a tie counts as wrong) and mean loss."""
    r_chosen, r_rejected = (reward_model_scores(model, *padded(seqs), batch_size) for seqs in (chosen, rejected))
    return (r_chosen > r_rejected).double().mean().item(), bradley_terry_loss(r_chosen, r_rejected).mean().item()


@torch.no_grad()
def calibrate(model, samples: list[torch.Tensor], batch_size: int) -> tuple[float, float]:
    """Divide the score head by the standard deviation of the samples' raw scores and store their (divided)
    mean in config.reward_offset, so that reward_model_scores gives them mean 0 and standard deviation 1.
    A positive scale keeps every preference. Returns the offset and the scale."""
    model.config.reward_offset = 0.0  # measure raw scores, whatever offset the model came with
    raw = reward_model_scores(model, *padded(samples), batch_size).double()
    scale = raw.std(correction=0).item() or 1.0  # one sample, or all alike: nothing to scale
    for p in model.score.parameters():
        p.div_(scale)
    model.config.reward_offset = raw.mean().item() / scale
    return model.config.reward_offset, scale


# ==== Training ====
def main() -> None:
    args = parse_args()
    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    device = torch.device(args.device if args.device.startswith("cuda") else "cuda" if cuda else "cpu")
    out_dir = Path(args.output_dir)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)  # prompts and label noise
    policy, tok = load_policy(args.model, device, chat=args.chat)
    model = new_reward_model(args.model, tok, device)
    n_train = args.num_pairs - args.eval_pairs
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    print(
        f"reward_model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), {device}\n"
        f"  {args.num_pairs} pairs ({n_train} to train on, label noise {args.label_noise}; {args.eval_pairs} held "
        f"out), {args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size} pairs -> {out_dir}"
    )

    # 1. Preferences: two responses per training prompt, kept when exactly one of them is right.
    start = last_print = time.time()
    pairs, sampled = [], 0
    while len(pairs) < args.num_pairs:
        if sampled >= MAX_SAMPLED_PER_PAIR * args.num_pairs:
            sys.exit(
                f"error: {args.model} at --temperature {args.temperature}: only {len(pairs)} of {sampled} sampled "
                f"pairs had one right and one wrong response, {args.num_pairs} needed"
            )
        prompts = train_prompts(rng, args.inference_batch_size)
        sampled_pairs = responses(policy, tok, prompts * 2, args.temperature, args)
        for first, second in zip(sampled_pairs[: len(prompts)], sampled_pairs[len(prompts) :]):
            if len(pairs) < args.num_pairs:
                sampled += 1
                pairs += filter(None, [preference(first, second)])
        if time.time() - last_print >= 10:
            last_print = time.time()
            print(f"sampling  {len(pairs)} of {args.num_pairs} pairs from {sampled} sampled  {last_print - start:.0f}s")
    held_out, train = pairs[: args.eval_pairs], pairs[args.eval_pairs :]  # i.i.d. pairs: a random split
    train = flip_labels(train, args.label_noise, rng)
    flipped = sum(chosen.gold() < rejected.gold() for chosen, rejected in train)
    held_out_chosen, held_out_rejected = ([pair[k].ids for pair in held_out] for k in (0, 1))
    chosen, rejected = ([pair[k].ids for pair in train] for k in (0, 1))

    # 2. Bradley-Terry: minimise −log σ(r_chosen − r_rejected), through the lines ppo.py scores with.
    before = pairwise(model, held_out_chosen, held_out_rejected, args.inference_batch_size)
    print(f"held-out accuracy {before[0]:.3f}  loss {before[1]:.3f}  before training  {time.time() - start:.0f}s")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    total_steps, step = args.epochs * steps_per_epoch, 0
    for epoch in range(1, args.epochs + 1):
        losses = []
        for idx in torch.randperm(n_train).split(args.batch_size):
            # Linear decay to 0, so the saved model is not a noisy snapshot of the last steps.
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * (1 - step / total_steps)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for mb in idx.split(args.micro_batch_size):
                ids, attn = padded([chosen[i] for i in mb] + [rejected[i] for i in mb])
                r_chosen, r_rejected = reward_model_scores(model, ids, attn, len(ids)).split(len(mb))
                loss = bradley_terry_loss(r_chosen, r_rejected).sum()
                (loss / len(idx)).backward()  # the minibatch's mean, whatever the micro-batches
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                sys.exit(f"error: non-finite loss at epoch {epoch}, step {step + 1}; nothing was saved")
            optimizer.step()
            step += 1
            losses.append(loss_sum / len(idx))
            if time.time() - last_print >= 10:
                last_print = time.time()
                print(f"epoch {epoch}  step {step:5d}/{total_steps}  loss {losses[-1]:.3f}  {last_print - start:.0f}s")
        accuracy, held_out_loss = pairwise(model, held_out_chosen, held_out_rejected, args.inference_batch_size)
        train_loss = sum(losses) / len(losses)
        print(f"epoch {epoch}  train loss {train_loss:.3f}  held-out accuracy {accuracy:.3f}  loss {held_out_loss:.3f}"
              f"  {time.time() - start:.0f}s")  # fmt: skip

    # 3. Shift: the starting policy's fresh samples score 0 on average (see the module docstring).
    prompts = train_prompts(rng, args.calibration_samples)
    samples = responses(policy, tok, prompts, args.calibration_temperature, args)
    offset, scale = calibrate(model, [r.ids for r in samples], args.inference_batch_size)
    metrics = {
        "held_out_accuracy_before": before[0],
        "held_out_accuracy": accuracy,
        "held_out_loss_before": before[1],
        "held_out_loss": held_out_loss,
        "train_loss": train_loss,  # mean over the last epoch, on the (noisy) training labels
        "reward_offset": offset,
        "reward_scale": scale,  # the score head was divided by it
        "num_pairs": args.num_pairs,
        "train_pairs": n_train,
        "eval_pairs": args.eval_pairs,
        "flipped_labels": flipped,
        "sampled_pairs": sampled,
        "skipped_pairs": sampled - args.num_pairs,  # both right or both wrong: no gold preference
        "seconds": round(time.time() - start, 3),
    }
    save(model, tok, out_dir, {"args.json": asdict(args), "metrics.json": metrics})
    print(
        f"reward_model: held-out accuracy {before[0]:.3f} -> {accuracy:.3f} in {metrics['seconds']:.0f}s, "
        f"{sampled - args.num_pairs} of {sampled} sampled pairs skipped, scale {scale:.3f}, offset {offset:.4f}; "
        f"saved to {out_dir}"
    )


# ==== Below: the machinery a reader may skip. ============================================================
# The language model: loading and sampling, the same code in reinforce.py, actor_critic.py, ppo.py and grpo.py
# (tests/test_shared.py checks it); the reward model's scores, the same code in ppo.py (tests/test_reward_model.py).
def load_policy(name: str, device: torch.device, dtype: torch.dtype = torch.float32, chat: bool = False):
    """Any causal LM and its tokenizer, its weights in `dtype` whatever dtype the checkpoint was saved in.
    Dropout is switched off in the config, so training mode (which gradient checkpointing needs) computes the
    same policy that sampled. Every stop token (the tokenizer's EOS and those of the generation config) ends up
    in generation_config.eos_token_id. Tokenizers without a pad token reuse EOS for padding: padding is tracked
    by masks, never by id. With `chat`, prompts will be conversations: the tokenizer needs a chat template.
    Ids at or past model.token_id_limit are not the tokenizer's (rows that pad the
    embedding table: Qwen2.5 has 151,936 and 151,665 tokens): they decode to nothing, so they are never sampled."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading notes (a BERT's advice to set is_decoder) would break the one error line
    try:
        config = AutoConfig.from_pretrained(name)
        tok = AutoTokenizer.from_pretrained(name)
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load {name}: {str(e).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(verbosity)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):  # one a config does not name
            module.p = 0.0
    if model.base_model is model:  # Llama4ForCausalLM, MllamaForCausalLM: the body is not base_model
        sys.exit(f"error: {name}: {type(model).__name__} has no base_model to read the hidden states from")
    model.token_id_limit = min(max(tok.get_vocab().values()) + 1, model.get_output_embeddings().weight.shape[0])
    # Log-probs come from the LM head applied to the last hidden state (see response_logprobs): a model that
    # changes its logits after the head (soft-capping, scaling) would be trained on the wrong ones. And a
    # causal LM's first position does not see the second (a BERT's does). Both probed on the same input.
    with torch.no_grad(), autocast(device):
        probe = torch.tensor([[1, 1], [1, 2]], device=device) % model.token_id_limit
        direct = model(input_ids=probe).logits.float()
        rebuilt = model.get_output_embeddings()(model.base_model(input_ids=probe).last_hidden_state).float()
    if not torch.allclose(direct[0, 0], direct[1, 0], rtol=1e-5, atol=1e-5 * direct[:, 0].abs().max().item()):
        sys.exit(f"error: {name} is not a causal language model: its first position sees the tokens after it")
    if not torch.allclose(direct, rebuilt, rtol=1e-3, atol=1e-3):
        sys.exit(f"error: {name} transforms its logits after the LM head, which this script does not support")
    eos = model.generation_config.eos_token_id
    stops = sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    if not stops:
        sys.exit(f"error: {name} has no EOS token: a response could never end")
    if chat and tok.chat_template is None:
        sys.exit(f"error: --chat: the tokenizer of {name} has no chat template")
    model.generation_config.eos_token_id = stops
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, index i with probability w_i / Σ_j w_j: the first i with c_i ≥ (1 − u)·c_last, c the cumulative
    sum (float64) and u [rows] uniform on [0, 1). An entry of weight 0 is never chosen."""
    c = weights.double().cumsum(-1)
    return torch.searchsorted(c, (1 - u[:, None]) * c[:, -1:]).squeeze(-1)


def sample_token(logits: torch.Tensor, temperature: float, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One token per row of logits [B, V] from softmax(logits / T), exactly, given two uniform numbers per row
    u [2, B], and overwriting logits to save a copy. The CDF is inverted in two stages, a block of `block` tokens
    by the blocks' mass (u[0]), then a token within it (u[1]). torch.multinomial draws one number per vocabulary
    entry, which with 150,000 tokens on a CPU costs more than the forward pass (docs/scaling.md); and one float32
    cumulative sum over the vocabulary would round tokens lighter than 6e-8 of the mass to probability 0."""
    p = logits.div_(temperature)
    p = p.sub_(p.amax(-1, keepdim=True)).exp_()  # softmax without its normaliser, which cancels
    n, vocab = p.shape
    block = min(block, vocab)
    full = vocab - vocab % block  # the last block may be short
    mass = torch.cat([p[:, :full].view(n, -1, block).sum(-1), p[:, full:].sum(-1, keepdim=True)], 1)
    columns = inverse_cdf(mass, u[0])[:, None] * block + torch.arange(block, device=p.device)
    within = torch.where(columns < vocab, p.gather(1, columns.clamp(max=vocab - 1)), 0.0)
    # A row of NaN or all −inf has no distribution; its id stays in range (sample reports the row).
    return columns.gather(1, inverse_cdf(within, u[1])[:, None]).squeeze(-1).clamp(max=vocab - 1)


@torch.no_grad()
def sample(model, tok, prompts: list, max_new_tokens: int, temperature: float, batch_size: int, greedy=False,
           generator=None, cuda_graph=False):  # fmt: skip
    """Left-padded sampling with a KV cache, batch_size prompts at a time. A prompt is text, or a conversation
    (a list of {"role", "content"} messages) for the chat template (see prompt_ids). Returns the token ids
    [B, P+T], the attention mask [B, P+T] (exactly the one training uses), the prompt width P, the response
    mask [B, T] (1 on every generated token up to and including the first stop token, 0 after it) and whether
    each response ended on a stop token [B] (False: it was cut off). The stop tokens are
    generation_config.eos_token_id, where load_policy put the tokenizer's EOS too. Logits that are NaN or inf
    for a response still being written raise FloatingPointError: there is no distribution to sample. With
    cuda_graph (on a GPU), each decoding step after the first replays a CUDA graph of it: the same ids."""
    encoded = [prompt_ids(tok, prompt) for prompt in prompts]
    width = max(map(len, encoded))
    prompt_ids_ = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded], device=model.device)
    prompt_attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    stops = torch.tensor(model.generation_config.eos_token_id, device=model.device)
    finite, responses = torch.ones((), dtype=torch.bool, device=model.device), []
    for ids, attn in zip(prompt_ids_.split(batch_size), prompt_attn.split(batch_size)):
        decoder = Decoder(model, ids, attn, stops, max_new_tokens, temperature, greedy, generator, tok.pad_token_id)
        responses.append(decoder.run(cuda_graph and model.device.type == "cuda"))
        finite &= decoder.finite
    if not finite:
        raise FloatingPointError("the policy's logits are NaN or inf")
    width = max(r.shape[1] for r in responses)
    response = torch.cat(
        [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=tok.pad_token_id) for r in responses]
    )
    stopped = torch.isin(response, stops)
    mask = stopped.cumsum(1) - stopped.long() == 0  # no stop token before t
    ids, attn = torch.cat([prompt_ids_, response], 1), torch.cat([prompt_attn, mask.long()], 1)
    return ids, attn, prompt_ids_.shape[1], mask, stopped.any(1)


class Decoder:
    """The sampling loop of one batch of left-padded prompts [n, P]: the prompt in one pass, then a token per step.
    Everything a step reads or writes is a tensor of fixed shape on the device, updated in place: the KV cache is
    static (room for P + max_new_tokens positions, the attention mask as long), the step index t lives on the
    device, and every step's two uniform numbers per row are drawn up front. So a step can be captured once as a
    CUDA graph and replayed: one launch instead of one per kernel (a GPU otherwise idles while Python launches a
    few hundred small kernels per token), computing exactly what the step computes when called."""

    def __init__(self, model, ids, attn, stops, max_new_tokens: int, temperature: float, greedy: bool, generator,
                 pad_token_id: int):  # fmt: skip
        (n, self.width), device = ids.shape, ids.device
        self.model, self.ids, self.attn, self.stops, self.steps = model, ids, attn, stops, max_new_tokens
        self.temperature, self.greedy = temperature, greedy
        self.generator = generator or default_generator(device)
        self.rng_state = self.generator.get_state()
        # u[t] holds step t's two numbers per row, in the order drawing them step by step would give them.
        self.u = None if greedy else torch.rand(max_new_tokens, 2, n, dtype=torch.float64, device=device,
                                                generator=self.generator)  # fmt: skip
        self.cache = StaticCache(config=model.config, max_cache_len=self.width + max_new_tokens)
        self.attention = torch.cat([attn, attn.new_zeros(n, max_new_tokens)], 1)  # a column per position to come
        self.tokens = ids.new_full((n, max_new_tokens), pad_token_id)
        self.pad = torch.tensor(pad_token_id, device=device)
        self.alive = torch.ones(n, dtype=torch.bool, device=device)  # no stop token sampled yet
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # every logit a live row was drawn from
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.steps_run = torch.zeros((), dtype=torch.long, device=device)  # steps with some row still alive
        self.last, self.position = ids[:, -1:].clone(), positions(attn)[:, -1:].clone()
        self.head = model.get_output_embeddings()
        self.head_weights = None  # set under autocast, in run()

    def pick(self, hidden: torch.Tensor) -> None:
        """Token t of every row from the last hidden states [n, H]; a row that has stopped gets padding."""
        logits = lm_head_logits(hidden, *self.head_weights)  # [n, V] over the ids that are tokens, float32
        self.finite &= ~(self.alive & ~logits.amax(-1).isfinite()).any()  # NaN, +inf, or all −inf
        if self.greedy:
            token = logits.argmax(-1)
        else:
            token = sample_token(logits, self.temperature, self.u.index_select(0, self.t.view(1))[0])
        token = torch.where(self.alive, token, self.pad)
        self.tokens.index_copy_(1, self.t.view(1), token[:, None])
        self.attention.index_copy_(1, (self.t + self.width).view(1), self.alive.long()[:, None])
        self.steps_run += self.alive.any()
        self.alive &= ~torch.isin(token, self.stops)
        self.last.copy_(token[:, None])
        self.position += 1
        self.t += 1

    def step(self) -> None:
        """The next token, from the last one and the cache."""
        out = self.model.base_model(input_ids=self.last, attention_mask=self.attention, position_ids=self.position,
                                    cache=self.cache, use_cache=True)  # fmt: skip
        self.pick(out.last_hidden_state[:, -1])

    def run(self, cuda_graph: bool, check_every: int | None = None) -> torch.Tensor:
        """The responses [n, T], T the steps until every row stopped (at most max_new_tokens). Whether any row is
        alive is asked every `check_every` steps: by default after every step on a CPU, every 8 on a GPU, where
        asking waits for the GPU; the steps run in between write padding and are cut off. The generator ends
        where drawing step by step would have left it. With cuda_graph, steps 2 on replay a CUDA graph."""
        every = check_every or (1 if self.ids.device.type == "cpu" else 8)
        graph = None
        with autocast(self.ids.device):  # once: the weights are cast to bf16 once, not at every step
            limit, bias = self.model.token_id_limit, self.head.bias
            self.head_weights = (self.head.weight[:limit].to(head_dtype(self.head, self.ids.device)),
                                 None if bias is None else bias[:limit])  # fmt: skip
            prompt = dict(input_ids=self.ids, attention_mask=self.attention, position_ids=positions(self.attn))
            out = self.model.base_model(**prompt, cache=self.cache, use_cache=True)
            self.pick(out.last_hidden_state[:, -1])
            for i in range(1, self.steps):
                if i % every == 0 and not self.alive.any():
                    break
                if cuda_graph and i == 2:  # step 1 ran as is: a warm-up
                    graph = capture(self.step)
                graph.replay() if graph is not None else self.step()
        steps_run = int(self.steps_run)
        if not self.greedy:
            self.generator.set_state(self.rng_state)
            torch.rand(steps_run, 2, len(self.ids), dtype=torch.float64, device=self.ids.device,
                       generator=self.generator)  # fmt: skip
        return self.tokens[:, :steps_run]


def default_generator(device: torch.device) -> torch.Generator:
    """The generator torch.rand draws from on `device` when given none."""
    if device.type != "cuda":
        return torch.default_generator
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def capture(step) -> torch.cuda.CUDAGraph:
    """A CUDA graph of step(), recorded without running it: each replay runs its kernels on the tensors it used."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def prompt_ids(tok, prompt) -> list[int]:
    """A prompt's token ids. A conversation is rendered by the tokenizer's chat template with the generation
    prompt and tokenized in the same call; text is tokenized as the tokenizer does, its special tokens (a BOS)
    included, unless the text begins with the BOS already, as a template rendered to text does: never two."""
    if not isinstance(prompt, str):
        return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    starts_with_bos = tok.bos_token is not None and prompt.startswith(tok.bos_token)
    return tok(prompt, add_special_tokens=not starts_with_bos)["input_ids"]


def conversations(prompts: list, chat: bool) -> list:
    """With --chat, each text prompt as the user's message of a conversation, for the chat template."""
    return [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p for p in prompts]


def decode(tok, response_ids: torch.Tensor, response_mask: torch.Tensor, finished: torch.Tensor) -> list[str]:
    """Each completion as sampled, without the stop token that ended it. Special tokens stay: a pad
    or BOS inside a response is part of what the reward judges, never dropped for free."""
    lengths = (response_mask.sum(1) - finished.long()).tolist()
    return [tok.decode(row[:n], skip_special_tokens=False) for row, n in zip(response_ids.tolist(), lengths)]


def head_dtype(lm_head, device: torch.device) -> torch.dtype:
    """The dtype the LM head's product runs in: autocast's (bf16) where it is on, else the weight's own."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else lm_head.weight.dtype


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b. Of bf16 matrices, in float32, never rounded to bf16: their products are exact in float32, and the GPU's
    tensor cores sum them in float32 and return that (torch.mm's out_dtype); a CPU does the same sums in float32."""
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype != torch.bfloat16:
            return a @ b
        return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.float() @ b.float()


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """z = h·Wᵀ + b [N, V] in float32 (float64 stays), from hidden states [N, H] and the head's weight in the dtype
    the product runs in (head_dtype). Autocast's own LM head would round z to bf16: a logit near 20 moves in steps
    of 0.125, as wide as PPO's clip after T = 0.5."""
    z = product(hidden.to(weight.dtype), weight.t())
    return z if bias is None else z + bias.to(z.dtype)


def responses(policy, tok, prompts: list[str], temperature: float, args: Args) -> list[Response]:
    """A sampled response to each prompt: what `reward` judges and what the reward model reads."""
    model_prompts = conversations(prompts, args.chat)  # with --chat, each a user's message
    ids, attn, prompt_width, mask, finished = sample(policy, tok, model_prompts, args.max_new_tokens, temperature,
                                                 args.inference_batch_size, cuda_graph=args.cuda_graphs)  # fmt: skip
    texts = decode(tok, ids[:, prompt_width:], mask, finished)
    sequences = [row[keep] for row, keep in zip(ids.cpu(), attn.cpu().bool())]  # the real tokens, no padding
    return [Response(*response) for response in zip(prompts, texts, finished.tolist(), sequences)]


def padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences of different lengths as one right-padded batch: ids and attention mask."""
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    lengths = torch.tensor([len(seq) for seq in sequences])
    return ids, (torch.arange(ids.shape[1]) < lengths[:, None]).long()


def new_reward_model(name: str, tok, device: torch.device):
    """The causal LM `name` as a sequence classifier with one output: its backbone, and a new linear `score`
    head on the last hidden state (drawn from torch's generator, so seeded). Kept in eval mode throughout, as
    ppo.py loads it: no dropout, so the score trained is the score PPO reads."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the new head as missing, as it is meant to be
    try:
        # float32 whatever the checkpoint's dtype (Qwen2.5 and Llama 3 are saved in bf16): Adam trains it.
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, dtype=torch.float32)
        model = model.to(device).eval()
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load {name} as a sequence classifier: {str(e).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(verbosity)
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        sys.exit(f"error: {name} as a sequence classifier has no `score` head on its last hidden state")
    model.config.pad_token_id = tok.pad_token_id  # its own forward finds the last token by it
    return model


def reward_model_scores(model, ids: torch.Tensor, attn: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The reward model's score of each sequence of token ids as the policy sampled it (the prompt, rendered
    once, and the response up to and including its stop token), never decoded and tokenized again: a policy
    cannot spell a special token out of ordinary ones, and the reward model reads the very conversation the
    policy answered. Read at each row's last real token (the stop token, or the last of a cut-off response),
    with position ids from its first, whatever the padding. The head runs in float32: a bf16 score near an
    offset of 20 would be rounded to steps of 0.125. Minus config.reward_offset, where reward_model.py stores
    the mean score of the starting policy's samples."""
    scores = []
    for i in range(0, len(ids), batch_size):
        chunk_ids, chunk_attn = ids[i : i + batch_size].to(model.device), attn[i : i + batch_size].to(model.device)
        last = chunk_attn.shape[1] - 1 - chunk_attn.flip(1).argmax(1)
        inputs = dict(input_ids=chunk_ids, attention_mask=chunk_attn, position_ids=positions(chunk_attn))
        with autocast(model.device):
            hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[torch.arange(len(last)), last]
        head = model.score
        bias = None if head.bias is None else head.bias.float()
        scores.append(torch.nn.functional.linear(hidden.float(), head.weight.float(), bias).squeeze(-1))
    return torch.cat(scores) - getattr(model.config, "reward_offset", 0.0)


# ==== Below: the plumbing. Command line and saving. ====
def check_versions() -> None:
    """Python, torch and transformers new enough for this file, or one error line before any work: under
    transformers 4.x, the names of 5 that these scripts pass (`dtype=`, `cache=`) would fail only mid-run."""
    found = {"Python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__}
    found["transformers"] = transformers.__version__
    for name, least in (("Python", (3, 11)), ("torch", (2, 6)), ("transformers", (5, 0))):
        if tuple(map(int, re.match(r"(\d+)\.(\d+)", found[name]).groups())) < least:
            sys.exit(f"error: {Path(__file__).name} needs {name} >= {least[0]}.{least[1]}; this is {found[name]}")


def parse_args() -> Args:
    """The command line, checked: bad input ends the run here with one line on stderr."""
    check_versions()
    argv = sys.argv[1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tyro's own message: a box drawn for a terminal
            args = tyro.cli(Args, args=argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    except SystemExit as e:
        if e.code == 0:
            raise  # --help, printed on stdout
        sys.exit(f"error: {cli_error(argv)}")
    args.output_dir = args.output_dir or f"runs/reward_model-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.output_dir)
    flag = lambda name: "--" + name.replace("_", "-")
    at_least_one = ["eval_pairs", "max_new_tokens", "epochs", "batch_size", "micro_batch_size"]
    at_least_one += ["inference_batch_size", "calibration_samples"]
    problems = [(not getattr(args, name) >= 1, f"{flag(name)} must be >= 1") for name in at_least_one]
    positive = ["learning_rate", "temperature", "calibration_temperature"]
    problems += [(not getattr(args, name) > 0, f"{flag(name)} must be > 0") for name in positive]
    problems += [
        (
            not args.num_pairs > args.eval_pairs,
            f"--num-pairs {args.num_pairs} leaves no pair to train on after --eval-pairs {args.eval_pairs}",
        ),
        (not 0 <= args.label_noise <= 0.5, "--label-noise must be in [0, 0.5]: beyond 0.5 it reverses the preference"),
        (out.exists() and not out.is_dir(), f"--output-dir {out} is a file, not a folder"),
        # The save replaces the whole folder: never one that holds anything but a reward model, and that only
        # when asked.
        (
            out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").exists(),
            f"--output-dir {out} exists and is not a reward model's folder: the save would replace it",
        ),
        (
            (out / "metrics.json").exists() and not args.overwrite,
            f"--output-dir {out} holds a reward model: write to another --output-dir, or replace it with --overwrite",
        ),
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


def save(model, tok, path: Path, files: dict[str, dict]) -> None:
    """The reward model and its tokenizer (loadable with from_pretrained) and `files` as JSON beside them.
    Written to a temporary folder first, so an interrupted save never destroys the previous one."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def one_line_errors():
    """sys.exit("error: ...") as one write to stderr and exit status 1: under torchrun several processes
    write at once, and Python's own handler writes the message and its newline apart, interleaving them.
    A non-finite number (FloatingPointError) ends the same way, saying where: the run is never stepped on it."""
    try:
        yield
    except (SystemExit, FloatingPointError) as e:
        message = e.code if isinstance(e, SystemExit) else f"error: {e}"
        run = getattr(globals().get("Run"), "active", None)  # this process's run, if it made one (and has Run)
        if isinstance(e, FloatingPointError) and run is not None and run.iteration is not None:
            message += f" at iteration {run.iteration}; the last save is in {run.dir}"
        if not isinstance(message, str):
            raise
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    with one_line_errors():
        main()
