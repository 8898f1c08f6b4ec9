"""Group Relative Policy Optimization on a causal language model (Shao et al., "DeepSeekMath", 2024): PPO without
a critic, whose baseline is the group of G responses sampled for the same prompt.

For each prompt, sample G responses from π_old and score them r_1 … r_G. Every token of response i gets the
advantage of the whole response, its score against the rest of its group:

    A_i = r_i − mean_{j≠i} r_j        --baseline leave-one-out: exactly unbiased (reinforce.py's RLOO)
    A_i = r_i − mean_j r_j            --baseline group-mean (the paper's): (G − 1)/G of the same
    A_i ← A_i / std(r_1 … r_G)        --scale-advantages group (the paper's); batch: one std for all; none

A group whose scores are all equal has A = 0 and teaches nothing; by default (DAPO's dynamic sampling, up to
--max-sampling-rounds rounds of prompts) such groups are dropped, judged by the raw score, and more prompts are
sampled until the batch is full.
Then, as PPO does, several epochs of shuffled minibatches on the batch, a gradient step on each, ascending

    L(θ) = Σ_i Σ_t w_{i,t}·[ min(r_t(θ)·A_i, clip(r_t(θ), 1 − ε_low, 1 + ε_high)·A_i) − β·k_t ],   r_t = π_θ/π_old

where w weighs each token in the minibatch (--loss-aggregation: over all its tokens, over each response's then
over responses as the paper, or by a constant as Dr. GRPO) and k_t is a per-token estimate of KL(π_θ‖π_ref)
(--kl-penalty: k3 as the paper or k2 in the loss; or k1 taken out of the loss and put in the reward, as ppo.py).
ε_high > ε_low is DAPO's clip-higher. Two other surrogates of 2025: --ratio sequence (GSPO) puts the response's
ratio s_i = exp(mean_t log r_t) in place of r_t, one clip per response; --surrogate cispo (CISPO) ascends
sg[clip(r_t)]·A_i·log π_θ, so a token whose ratio is clipped keeps its gradient.
What GRPO keeps from PPO: the ratio and its clip over several updates of one batch. What it drops: the critic
and GAE; a prompt costs G samples instead of one sample and a value model. tests/test_grpo.py proves what each
choice does to the expected step (docs/grpo.md): leave-one-out is exactly along ∇J; batch scaling and token
averaging are consistent (along ∇J as the batch grows), not unbiased. The paper's GRPO is

    python grpo.py --baseline group-mean --scale-advantages group --loss-aggregation sequence \
        --kl-coef 0.04 --kl-penalty k3-loss --max-sampling-rounds 1

    python grpo.py                              # the embedded addition policy, a few minutes on a CPU
    torchrun --nproc-per-node 8 grpo.py ...     # the same algorithm, data-parallel over 8 GPUs
    torchrun --nproc-per-node 8 grpo.py --fsdp  # the same, each GPU holding 1/8 of the weights and Adam's state
    python grpo.py --resume runs/grpo-1-...     # continue an interrupted run from its last save
    python grpo.py --help

The file, in reading order: Args; the task (`reward` and the prompts: the block to replace for your own task);
GRPO's pieces (group_advantages, batch_advantages, kl_penalty, token_weights, policy_loss, collect); main() with
the loop; then, below the banners, the language-model machinery and the plumbing, the same in every script.
Self-contained on purpose: copy this file (it needs nothing else from this project) into yours.

Needs Python >= 3.11, torch >= 2.6 and transformers >= 5 (4.x lacks the `dtype=` and `cache=` the code passes;
the script stops at start, saying so), and tyro. Tested with requirements.txt's pins: torch 2.13, transformers 5.24.
MIT licence (the text is in LICENSE), Copyright (c) 2026 the authors of this repository: copy it, with this notice.
"""

import contextlib
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
import transformers
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, StaticCache
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
hf_logging.disable_progress_bar()  # loading and saving bars would drown the training log


@dataclass
class Args:
    # ---- The run ----
    model: str = str(HERE / "checkpoints" / "sft-addition")
    """starting policy: a local folder or a Hugging Face hub name"""
    seed: int = 1
    """seed for the prompts, the sampling and everything else random, in [0, 2**32) (torchrun's process k draws
    from its own stream: see stream_seed)"""
    total_episodes: int = 128_000
    """sampled responses to train on"""
    eval_every: int = 6_400
    """episodes between evaluations and saves (one also runs before the first update and after the last)"""
    output_dir: str | None = None
    """where metrics.jsonl, args.json and model/ go (None: runs/grpo-<seed>-<time>)"""
    resume: str | None = None
    """continue the run saved in this folder, with its own arguments (give no other flag)"""
    overwrite: bool = False
    """replace the run in --output-dir, if one is there (else a run refuses to start there)"""
    device: str = "auto"
    """auto = cuda when available, else cpu"""
    # ---- Sampling ----
    num_prompts: int = 64
    """prompts per iteration, over all processes"""
    group_size: int = 4
    """G: responses sampled for each prompt, the group whose scores are each one's baseline"""
    max_sampling_rounds: int = 4
    """DAPO's dynamic sampling: rounds of --num-prompts prompts an iteration may sample to fill its batch with groups
    whose scores differ (others are dropped); a batch still short after the last round is topped up with groups
    of equal scores. 1 = off: every group sampled is trained on"""
    max_new_tokens: int = 6
    """longest response; one that has not emitted a stop token by then is cut off and scores 0"""
    temperature: float = 0.5
    """sampling temperature, used identically when computing log-probs"""
    chat: bool = False
    """give each prompt to the model as a user's message, rendered by its tokenizer's chat template"""
    # ---- GRPO ----
    learning_rate: float = 3e-5
    """Adam learning rate at the first update; it falls linearly, to lr/N at the last of N"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""
    ppo_epochs: int = 4
    """μ: passes over each batch (TRL's num_iterations)"""
    num_minibatches: int = 4
    """gradient steps per epoch; must divide --num-prompts x --group-size"""
    clip_range: float = 0.2
    """ε_low: the ratio π_θ/π_old earns nothing for leaving [1 − ε_low, 1 + ε_high]"""
    clip_range_high: float | None = None
    """ε_high, the clip's upper side (DAPO's clip-higher: above ε_low); None = --clip-range, PPO's symmetric clip"""
    ratio: Literal["token", "sequence"] = "token"
    """the ratio that is clipped: per token, r_t = π_θ/π_old (PPO, GRPO), or per response,
    s_i = exp(mean_t log r_t) (GSPO)"""
    surrogate: Literal["clip", "cispo"] = "clip"
    """the per-token objective: PPO's min(r·A, clip(r)·A), or CISPO's sg[clip(r)]·A·log π_θ, whose clipped tokens
    keep their gradient"""
    baseline: Literal["leave-one-out", "group-mean"] = "leave-one-out"
    """b in A = r − b: the mean score of the group's other responses, or of the whole group (the paper's)"""
    scale_advantages: Literal["none", "batch", "group"] = "batch"
    """divide the advantages by nothing (Dr. GRPO), by one std over the batch, or by each group's std (the paper's)"""
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"
    """the loss's mean over the minibatch's tokens (DAPO, ppo.py), over each response's then over responses (the
    paper's), or its sum over N x --max-new-tokens (Dr. GRPO)"""
    # ---- KL and reward ----
    kl_coef: float = 0.0
    """β, the price of a nat of KL(π_θ‖π_ref) (0 = no reference model)"""
    kl_penalty: Literal["k1-reward", "k2-loss", "k3-loss"] = "k1-reward"
    """where the KL goes: −β·Σ_t k1 in each response's reward (ppo.py's), or β·k2 or β·k3 per token in the loss"""
    # ---- Memory ----
    micro_batch_size: int = 64
    """responses per forward/backward pass of the update; gradients accumulate over micro-batches"""
    inference_batch_size: int = 256
    """responses per pass without gradients: sampling, π_ref, evaluation (π_old takes the update's micro-batches)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: far less memory, about a third more time"""
    cuda_graphs: bool = True
    """on a GPU, replay each decoding step as a CUDA graph: the same tokens, without a kernel launch per operation"""
    lora_rank: int = 0
    """r > 0: train rank-r adapters (LoRA) on the linear layers and freeze every weight (0: every weight trains);
    π_ref is then the model with its adapters off. RL needs little capacity: rank 1 works, at ~10x the learning rate"""
    lora_alpha: float = 32.0
    """α: the adapters' output is scaled by α/r"""
    lora_targets: str = "all-linear"
    """the layers given adapters: all-linear (every linear layer of the body; never the LM head), or name endings
    separated by commas, such as q_proj,v_proj"""
    fsdp: bool = False
    """under torchrun, shard the weights, gradients and Adam's state of π_θ and π_ref over the
    processes (PyTorch's FSDP2) instead of a whole copy in each: full fine-tuning past one GPU's memory. Decoding
    then runs without CUDA graphs (FSDP's hooks run in every step)"""


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


# ==== GRPO. Token tensors are [B, T] over response tokens, masks bool; padding may hold anything, NaN included. ====
def group_advantages(
    scores: torch.Tensor, baseline: Literal["group-mean", "leave-one-out"], scale: bool
) -> torch.Tensor:
    """Advantages [P, G] of P groups of G responses from their scores r [P, G], one per response:

        group-mean:     A_i = r_i − (1/G)·Σ_j r_j                 (the baseline includes r_i itself)
        leave-one-out:  A_i = r_i − 1/(G − 1)·Σ_{j≠i} r_j = G/(G − 1)·(r_i − mean_j r_j)
        scale=True:     A_i ← A_i / std(r_1, …, r_G)           (GRPO's; the sample std, as torch.std, TRL, veRL)

    A group whose scores are all equal carries no signal: its A_i are 0 exactly, not rounding over rounding. The
    scores are rescaled before they are summed or squared, so finite scores never give NaN (docs/grpo.md,
    "Numerical hazards"). With G = 1, group-mean gives 0; leave-one-out needs G ≥ 2."""
    G = scores.shape[-1]
    if baseline not in ("group-mean", "leave-one-out"):
        raise ValueError(f"baseline must be 'group-mean' or 'leave-one-out', not {baseline!r}")
    if baseline == "leave-one-out" and G < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 responses per group")
    if G == 1:
        return torch.zeros_like(scores)
    constant = (scores == scores[..., :1]).all(-1, keepdim=True)
    size = torch.where(constant, 1.0, scores.abs().amax(-1, keepdim=True))
    deviations = scores / size - (scores / size).sum(-1, keepdim=True) / G  # (r_i − mean r) / size
    c = 1.0 if baseline == "group-mean" else G / (G - 1)
    if scale:
        largest = torch.where(constant, 1.0, deviations.abs().amax(-1, keepdim=True))
        unit = deviations / largest  # |unit| ≤ 1, and 1 somewhere in a group that is not constant
        std = (unit.pow(2).sum(-1, keepdim=True) / (G - 1)).sqrt()  # the std of r, over size·largest: ≥ 1/√(G − 1)
        advantages = c * unit / torch.where(constant, 1.0, std)
    else:
        advantages = c * deviations * size
    return torch.where(constant, 0.0, advantages)


def scale_by_batch_std(advantages: torch.Tensor) -> torch.Tensor:
    """The advantages divided by one standard deviation, of all the batch's (every process's): centred already,
    they keep their mean of 0 and each prompt its weight, and the step no longer depends on the reward's
    units. They are divided by the largest |A| first, so no square overflows or underflows to 0. A batch whose
    advantages are all 0 stays 0."""
    largest = global_max(advantages.abs().max())
    unit = advantages / torch.where(largest > 0, largest, 1.0)
    n = global_sum(torch.tensor(advantages.numel(), device=advantages.device))
    rms = (global_sum(unit.pow(2).sum()) / n).sqrt()
    return unit / torch.where(rms > 0, rms, 1.0)


def scores_differ(scores: torch.Tensor) -> torch.Tensor:
    """Whether each group [..., G] of raw scores holds two different scores: those whose scores are all equal
    have A = 0 (β = 0), and dynamic sampling drops them."""
    return ~(scores == scores[..., :1]).all(-1)


def batch_advantages(batch: dict, args: Args, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response's reward R_i and advantage A_i (one per row of the batch, G rows a group). With the KL in the
    reward, as ppo.py: R_i = r_i − β·Σ_t log(π_old/π_ref)(a_t|s_t), the per-token k1 of KL(π_θ‖π_ref) at θ_old."""
    rewards = batch["scores"]
    if beta > 0 and args.kl_penalty == "k1-reward":
        rewards = rewards - beta * torch.where(batch["mask"], batch["logp_old"] - batch["logp_ref"], 0.0).sum(1)
    groups = rewards.view(-1, args.group_size)
    advantages = group_advantages(groups, args.baseline, scale=args.scale_advantages == "group").flatten()
    if args.scale_advantages == "batch":
        advantages = scale_by_batch_std(advantages)
    return rewards, advantages


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: Literal["k1", "k2", "k3"]) -> torch.Tensor:
    """Per-token estimates of KL(π_θ‖π_ref) from tokens sampled from π_θ (Schulman, "Approximating KL divergence"):

        k1 = log π_θ − log π_ref,   k2 = ½·(log π_θ − log π_ref)²,   k3 = (ρ − 1) − log ρ,   ρ = π_ref/π_θ

    Each needs only the sampled token's log-probs, not a sum over the vocabulary; which KL each one's gradient
    follows is in docs/grpo.md. Padding may hold NaN: mask the result."""
    log_ratio = logp - logp_ref  # log π_θ/π_ref = −log ρ
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # log ρ at most 20, as veRL does: e^{log ρ} overflows float32 past 88; at 20 (π_θ < 2e-9·π_ref) the value
        # e^20 − 21 ≈ 4.9e8 and its square are finite, and the gradient is 0.
        log_rho = (-log_ratio).clamp(max=20.0)
        return torch.expm1(log_rho) - log_rho
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', not {estimator!r}")


def token_weights(
    mask: torch.Tensor,
    mode: Literal["sequence", "token", "constant"],
    n_responses: int,
    n_tokens: int,
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Each valid token's weight w [B, T] in the minibatch loss L = Σ_i Σ_t w_{i,t}·ℓ_{i,t} (0 on padding):

        sequence  (GRPO paper):    w = 1/(N·|y_i|)
        token     (DAPO, TRL):     w = 1/n_tokens
        constant  (Dr. GRPO):      w = 1/(N·max_new_tokens)

    N = n_responses and n_tokens count the whole minibatch, every micro-batch and process, so the micro-batches'
    losses sum to the minibatch's; a micro-batch's own counts would not (the bug veRL fixed twice). Which choice
    keeps the expected step along ∇J: docs/grpo.md. Under DistributedDataParallel, which averages the processes'
    gradients, the caller multiplies the loss by the number of processes."""
    if mode == "sequence":
        weight = 1.0 / (mask.sum(-1, keepdim=True).to(dtype) * n_responses)
    elif mode == "token":
        weight = torch.as_tensor(1.0 / n_tokens, dtype=dtype, device=mask.device)
    elif mode == "constant":
        weight = torch.as_tensor(1.0 / (n_responses * max_new_tokens), dtype=dtype, device=mask.device)
    else:
        raise ValueError(f"mode must be 'sequence', 'token' or 'constant', not {mode!r}")
    return torch.where(mask, weight, torch.zeros((), dtype=dtype, device=mask.device))


def weighted_loss(token_loss: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share Σ_{i,t valid} w_{i,t}·ℓ_{i,t} of the minibatch loss; NaN padding stays out."""
    return torch.where(mask, weights * token_loss, 0.0).sum()


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ratio: Literal["token", "sequence"] = "token",
    surrogate: Literal["clip", "cispo"] = "clip",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token the loss ℓ_t, r_t = π_θ/π_old, and whether the clip changes ℓ_t; ρ_t is the ratio clipped:

        ratio token:      ρ_t = r_t                                                      (PPO, GRPO)
        ratio sequence:   ρ_t = sg[s_i]·π_θ(a_t|s_t)/sg[π_θ(a_t|s_t)],  s_i = exp((1/|y_i|)·Σ_t log r_t)   (GSPO)
        surrogate clip:   ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_t)      (PPO; DAPO: ε_high > ε_low)
        surrogate cispo:  ℓ_t = −sg[clip(ρ_t, 1 − ε_low, 1 + ε_high)]·A_t·log π_θ(a_t|s_t)   (CISPO)

    PPO's min keeps the objective a pessimistic bound on the unclipped one: the clip removes the incentive to
    move ρ_t further in the direction A_t favours, never the penalty for moving it the wrong way. CISPO clips the
    weight instead, so its gradient never vanishes; why GSPO's ρ_t is its sequence objective: docs/grpo.md."""
    if ratio not in ("token", "sequence") or surrogate not in ("clip", "cispo"):
        raise ValueError(
            f"ratio must be 'token' or 'sequence' and surrogate 'clip' or 'cispo', not {ratio!r}, {surrogate!r}"
        )
    log_ratio = logp - logp_old  # log r_t, from log-probs: no division by a tiny π_old
    log_rho = log_ratio
    if ratio == "sequence":  # the mean over the response's own tokens, padding left out (it may hold NaN)
        mean = torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
        log_rho = logp - logp.detach() + mean.detach()
    rho = torch.exp(log_rho)
    clipped = rho.clamp(1 - clip_low, 1 + clip_high)
    if surrogate == "clip":
        loss, binds = -torch.min(rho * advantages, clipped * advantages), clipped * advantages < rho * advantages
    else:
        loss, binds = -clipped.detach() * advantages * logp, clipped != rho
    return loss, torch.exp(log_ratio), binds


@torch.no_grad()
def rollout(policy, tok, prompts: list[str], args: Args) -> tuple[dict, int]:
    """A response to each prompt from π_old and its score. Returns the batch, a dict of tensors with a row per
    response, and the prompt width."""
    model_prompts = conversations(prompts, args.chat)  # with --chat, each a user's message
    size, temperature = args.inference_batch_size, args.temperature
    ids, attn, prompt_width, mask, finished = sample(
        policy, tok, model_prompts, args.max_new_tokens, temperature, size, cuda_graph=args.cuda_graphs
    )
    texts = decode(tok, ids[:, prompt_width:], mask, finished)
    scores = torch.tensor(list(map(reward, prompts, texts, finished.tolist())), device=ids.device)
    return dict(ids=ids, attn=attn, mask=mask, scores=scores), prompt_width


@torch.no_grad()
def score(policy, ref_policy, batch: dict, prompt_width: int, args: Args) -> dict:
    """The batch with log π_old and the entropy of π_old on its tokens, and log π_ref if β > 0. π_old in passes of
    the update's micro-batch shape: the same kernels, so r_t = 1 exactly before the first step."""
    ids, attn, temperature, size = batch["ids"], batch["attn"], args.temperature, args.inference_batch_size
    rows = min(args.micro_batch_size, len(ids) // args.num_minibatches)
    micro = [slice(i, i + rows) for i in range(0, len(ids), rows)]
    passes = [token_logprobs(policy, ids[c], attn[c], prompt_width, temperature, True) for c in micro]
    batch["logp_old"], batch["entropy"] = (torch.cat(x) for x in zip(*passes))
    if ref_policy is not None:
        chunks = [slice(i, i + size) for i in range(0, len(ids), size)]
        logp_ref = [token_logprobs(ref_policy, ids[c], attn[c], prompt_width, temperature)[0] for c in chunks]
        batch["logp_ref"] = torch.cat(logp_ref)
    return batch


def collect(policy, tok, rng: random.Random, args: Args, ref_policy, n_groups: int):
    """A batch of n_groups groups of G responses, and the raw scores [groups sampled, G] of every group sampled.
    Each round is a rollout of n_groups new prompts. With --max-sampling-rounds R > 1 (DAPO's dynamic sampling) the
    batch is the first n_groups groups whose raw scores differ, in the order sampled, after as many rounds as that
    takes, at most R (then groups of equal scores top it up). The raw score, because the KL-shaped reward differs
    in nearly every group. Kept groups are i.i.d. from those whose scores differ: the expected step is the
    unfiltered one over P(a group's scores differ) (docs/grpo.md). Only the batch kept is scored by π_old and π_ref."""
    rounds = []
    for _ in range(args.max_sampling_rounds):
        prompts = [p for p in train_prompts(rng, n_groups) for _ in range(args.group_size)]
        rounds.append(rollout(policy, tok, prompts, args))
        scores = torch.cat([batch["scores"] for batch, _ in rounds]).view(-1, args.group_size)
        differ = scores_differ(scores)
        if differ.sum() >= n_groups:
            break
    chosen = torch.cat([differ.nonzero(), (~differ).nonzero()]).flatten()[:n_groups].sort().values
    rows = (chosen[:, None] * args.group_size + torch.arange(args.group_size, device=chosen.device)).flatten()
    batch, prompt_width = join(rounds, tok.pad_token_id)
    return score(policy, ref_policy, {k: v[rows] for k, v in batch.items()}, prompt_width, args), prompt_width, scores


def join(parts: list[tuple[dict, int]], pad_id: int) -> tuple[dict, int]:
    """Batches of rollout as one, in the sampler's layout: prompts left-padded to the widest, responses (and
    their masks and per-token values) right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    prompt_width, width = max(n for _, n in parts), max(batch["mask"].shape[1] for batch, _ in parts)

    def pad(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        return torch.cat([x.new_full((len(x), left), value), x, x.new_full((len(x), right), value)], 1)

    joined = {}
    for key in parts[0][0]:
        columns = []
        for batch, n in parts:
            x, right = batch[key], width - batch["mask"].shape[1]
            if key in ("ids", "attn"):  # [B, P + T]
                x = pad(x, prompt_width - n, right, pad_id if key == "ids" else 0)
            elif x.dim() == 2:  # [B, T]: the response mask
                x = pad(x, 0, right, False if x.dtype == torch.bool else 0)
            columns.append(x)
        joined[key] = torch.cat(columns)
    return joined, prompt_width


def update_minibatch(learner, optimizer, minibatch: dict, prompt_width: int, args: Args, beta: float):
    """One gradient step on a minibatch (this process's share: a dict of [b, ...] tensors), summed over
    micro-batches. Each token's weight in the loss comes from the whole minibatch's counts, over every
    process (token_weights), so neither the micro-batch size nor the number of processes changes the step.
    Returns the gradient norm and, per micro-batch, the token mask, r_t, where the clip binds, the policy's loss
    and the KL term, for the log. A gradient that is not finite is never stepped on: FloatingPointError."""
    mask = minibatch["mask"]
    n_responses, n_tokens = global_sum(torch.tensor(len(mask), device=mask.device)), global_sum(mask.sum())
    # DistributedDataParallel averages gradients over processes, as FSDP does; the loss is a sum over them.
    world = dist.get_world_size() if dist.is_initialized() else 1
    micro = [
        {k: v[i : i + args.micro_batch_size] for k, v in minibatch.items()}
        for i in range(0, len(mask), args.micro_batch_size)
    ]
    clip_high = args.clip_range if args.clip_range_high is None else args.clip_range_high
    optimizer.zero_grad(set_to_none=True)
    logged = []
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1 or not isinstance(learner, DistributedDataParallel)  # average once, at the end
        with contextlib.nullcontext() if sync else learner.no_sync():
            logp, _ = learner(mb["ids"], mb["attn"], prompt_width, args.temperature)
            advantages = mb["advantages"][:, None].expand_as(logp)  # A_i on every token of response i
            pg_loss, ratio, clipped = policy_loss(
                logp, mb["logp_old"], advantages, mb["mask"], args.clip_range, clip_high, args.ratio, args.surrogate
            )
            kl = torch.zeros_like(logp)
            if args.kl_penalty != "k1-reward" and beta > 0:  # β·k per token, differentiated through log π_θ
                kl = kl_penalty(logp, mb["logp_ref"], args.kl_penalty.removesuffix("-loss"))
            weights = token_weights(
                mb["mask"], args.loss_aggregation, n_responses, n_tokens, args.max_new_tokens, logp.dtype
            )
            loss = weighted_loss(pg_loss + beta * kl, weights, mb["mask"])
            (loss * world).backward()
        logged.append((mb["mask"], ratio.detach(), clipped, pg_loss.detach(), kl.detach()))
    # With --fsdp, the norm of all the processes' shards together (a DTensor, the same in every process).
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), args.max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError("non-finite gradient")
    optimizer.step()
    return grad_norm, logged


# ==== Training ====
def main() -> None:
    args = parse_args()
    args.cuda_graphs &= not args.fsdp  # a graph would capture FSDP's hooks, which wait on its own CUDA streams
    device = start(args)  # the process group under torchrun, this process's device, its seed
    run = Run(args, "grpo", device)  # the output folder and the prompts' generator; on --resume, the last save
    # π_θ and, where β > 0, the frozen π_ref (see load_policies).
    policy, ref_policy, tok = load_policies(args, run.last_save, device, with_ref=args.kl_coef > 0)
    if args.gradient_checkpointing:  # non-reentrant: the recompute runs in the backward pass
        policy.activation_checkpointing_enable()
    agent = PolicyLogProbs(policy)  # π_θ: what Adam steps
    if args.fsdp:  # each process keeps a shard of every weight, before Adam is given them (see shard)
        shard(agent, ref_policy, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, fused=True)  # one kernel for all
    adapters = getattr(policy, "adapters", None)  # with --lora-rank: what trains in π_θ
    run.restore(**whole(agent, adapters=adapters, optimizer=optimizer))
    learner = agent if args.fsdp else data_parallel(agent)  # the agent, its gradients averaged over processes
    local_prompts = args.num_prompts // run.world
    batch_size, local_batch = args.num_prompts * args.group_size, local_prompts * args.group_size
    num_iterations = math.ceil(args.total_episodes / batch_size)
    beta = args.kl_coef
    run.begin(
        policy,
        f"{num_iterations} iterations x {batch_size} episodes ({args.num_prompts} prompts x "
        f"{args.group_size} responses), {args.ppo_epochs} epochs x {args.num_minibatches} minibatches, "
        f"up to {args.max_sampling_rounds} sampling rounds, baseline {args.baseline}, scale "
        f"{args.scale_advantages}, loss over {args.loss_aggregation}, {args.surrogate} of the {args.ratio} "
        f"ratio, kl_coef {beta} ({args.kl_penalty})"
        + (f", LoRA rank {args.lora_rank} on {len(adapters.layers)} layers" if adapters else ""),
    )

    # Iteration 0 measures the starting policy as every later iteration measures its own, and does not update.
    for iteration in run.iterations(num_iterations):
        # 1. Collect: a group of G responses to each of P prompts, their scores, and π_old and π_ref on them;
        #    with dynamic sampling, only groups whose scores differ, sampled in rounds of P prompts. (With --fsdp,
        #    the weights are gathered once for it: see gathered.)
        with gathered(agent, ref_policy):
            batch, prompt_width, sampled = collect(policy, tok, run.rng, args, ref_policy, local_prompts)
        run.note_equal_scores(sampled, iteration)

        # 2. Advantages: each response's reward against its group's, one A_i for all its tokens. With the KL
        #    in the reward, R_i = r_i − β·Σ_t log(π_old/π_ref), as ppo.py does.
        rewards, batch["advantages"] = batch_advantages(batch, args, beta)

        # 3. Update (not at iteration 0): epochs x shuffled minibatches, one Adam step each. The learning
        #    rate falls linearly from lr at the first update to lr/N at the last, so the last batches move the
        #    policy little.
        steps = []
        if iteration > 0:
            for param_group in optimizer.param_groups:
                param_group["lr"] = args.learning_rate * (1 - (iteration - 1) / num_iterations)
            learner.train()  # only gradient checkpointing cares: dropout is off
            for epoch in range(args.ppo_epochs):
                for idx in torch.randperm(local_batch, device=device).split(local_batch // args.num_minibatches):
                    minibatch = {k: v[idx] for k, v in batch.items()}
                    steps.append(update_minibatch(learner, optimizer, minibatch, prompt_width, args, beta))
            learner.eval()

        # 4. Log; evaluate and save every --eval-every episodes (rank 0 evaluates alone).
        row = {"iteration": iteration, "episodes": iteration * batch_size, "seconds": run.clock(), "beta": beta}
        row |= batch_stats(batch, rewards, sampled) | (update_stats(steps) if steps else {})
        due = run.evaluation_due(iteration, batch_size, num_iterations)
        if due:
            with gathered(agent):  # by every process under --fsdp; rank 0 evaluates alone
                row |= evaluate(policy, tok, args) if run.rank == 0 else {}
        run.log(row, "reward_mean", "kl", "entropy", "clip_fraction", "equal_score_groups")
        if due:  # after the row: a resume redoes everything after its last save
            run.save(row, policy, tok)
    run.finish()


def batch_stats(batch: dict, rewards: torch.Tensor, sampled: torch.Tensor) -> dict:
    """What the log says of a batch of responses, and of every group sampled for it [groups, G], over every
    process."""
    mask, scores = batch["mask"], batch["scores"]
    n = global_sum(torch.tensor(len(mask), device=mask.device))
    n_sampled = global_sum(torch.tensor(len(sampled), device=mask.device))
    row = {
        "reward_mean": global_sum(rewards.sum()) / n,  # score − β·KL with the KL in the reward, else the score
        "score_mean": global_sum(scores.sum()) / n,
        # The share of the groups sampled whose scores are all equal: with no KL in the reward their advantages
        # are 0. Dynamic sampling drops them, and samples this many rounds of --num-prompts prompts.
        "equal_score_groups": global_sum((~scores_differ(sampled)).sum()) / n_sampled,
        "sampling_rounds": n_sampled * sampled.shape[1] / n,
        "advantage_std": (global_sum(batch["advantages"].pow(2).sum()) / n).sqrt(),  # their mean is 0
        "entropy": masked_mean(batch["entropy"], mask),
        "response_length": global_sum(mask.sum()) / n,
    }
    if "logp_ref" in batch:  # KL(π_old‖π_ref) per response, in nats, by k1 and by k3
        log_ratio = batch["logp_old"] - batch["logp_ref"]
        row["kl"] = global_sum(masked_sum(log_ratio, mask)) / n
        row["kl_k3"] = global_sum(masked_sum(torch.expm1(-log_ratio) + log_ratio, mask)) / n
    return floats(row)


def update_stats(steps: list) -> dict:
    """Token means over every micro-batch of every step of an update, over every process."""
    grad_norms = [grad_norm for grad_norm, _ in steps]
    micro = [mb for _, logged in steps for mb in logged]
    mask, ratio, clipped, pg_loss, kl = (torch.cat(x) for x in zip(*micro))
    first_mask, first_ratio = (torch.cat(x) for x in list(zip(*steps[0][1]))[:2])
    log_ratio = ratio.log()
    stats = {
        "policy_loss": masked_mean(pg_loss, mask),
        "kl_loss": masked_mean(kl, mask),  # the estimator in the loss, per token (0 with the KL in the reward)
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": global_max(ratio[mask].max()),
        # The share of tokens where the clip changes the loss: PPO's clipped term is the smaller (as ppo.py counts
        # it); CISPO's weight is clipped.
        "clip_fraction": masked_mean(clipped.float(), mask),
        # CleanRL's approx_kl, (r − 1) − log r: k3 of KL(π_old‖π_θ), how far the update moved the policy.
        "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        # Before the first step π_θ = π_old, so every r_t of the first minibatch must be 1 up to rounding.
        "first_minibatch_ratio_error": global_max((first_ratio[first_mask] - 1).abs().max()),
        "grad_norm": torch.stack(grad_norms).mean(),
    }
    return floats(stats)


# ==== Below: the machinery a reader may skip. ============================================================
# The language model: loading, sampling, log-probs and evaluation, and the statistics over processes: the
# same code in reinforce.py, actor_critic.py, ppo.py and grpo.py (tests/test_shared.py checks that it is).
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


class Adapters(torch.nn.Module):
    """Low-rank adapters (Hu et al., "LoRA", 2021) on the linear layers of a model's body: a layer's output W₀x
    becomes W₀x + (α/r)·B·A·x, with A [r, in] random and B [out, r] zero, so a fresh adapter changes nothing. W₀
    stays frozen and only A and B train: the optimizer's state is a few bytes per adapted layer instead of 16 per
    parameter. Off (see `off`), the model is W₀ alone: π_ref, with no second copy of the model."""

    def __init__(self, body: torch.nn.Module, rank: int, alpha: float, targets: str):
        super().__init__()
        self.scale, self.enabled, self.layers = alpha / rank, True, {}
        self.A, self.B = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        wanted = None if targets == "all-linear" else tuple(targets.split(","))
        for name, layer in body.named_modules():
            if not isinstance(layer, (torch.nn.Linear, Conv1D)) or wanted and not name.endswith(wanted):
                continue
            n_out, n_in = layer.weight.shape if isinstance(layer, torch.nn.Linear) else layer.weight.shape[::-1]
            key = name.replace(".", "/")  # a ParameterDict key holds no dot
            like = dict(device=layer.weight.device, dtype=torch.promote_types(layer.weight.dtype, torch.float32))
            self.A[key] = torch.nn.Parameter(torch.empty(rank, n_in, **like))
            torch.nn.init.kaiming_uniform_(self.A[key], a=math.sqrt(5))  # as nn.Linear initialises its weight
            self.B[key] = torch.nn.Parameter(torch.zeros(n_out, rank, **like))
            self.layers[key] = layer
            layer.register_forward_hook(self.adapt(key))
        if not self.layers:
            sys.exit(f"error: --lora-targets {targets}: no linear layer of the model matches")

    def adapt(self, key: str):
        def hook(layer, inputs, output):  # W₀x + (α/r)·B·A·x
            if not self.enabled:
                return output
            delta = torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], self.A[key]), self.B[key])
            return output + self.scale * delta

        return hook

    @contextlib.contextmanager
    def off(self):
        """The base model W₀ alone, inside the block."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def merged(self, model) -> dict:
        """model's state dict with each adapted weight replaced by W₀ + (α/r)·B·A in W₀'s dtype: a model that
        from_pretrained loads without this code. (Conv1D, GPT-2's linear layer, stores W transposed.)"""
        names = {id(layer): name for name, layer in model.named_modules()}
        state = model.state_dict()
        for key, layer in self.layers.items():
            delta = self.scale * (self.B[key] @ self.A[key]).detach()
            delta = delta if isinstance(layer, torch.nn.Linear) else delta.t()
            state[names[id(layer)] + ".weight"] = (layer.weight.float() + delta).to(layer.weight.dtype)
        return {k: v for k, v in state.items() if not k.startswith("adapters.")}


class WithoutAdapters:
    """A policy with its adapters off, as the scripts' forward passes use a model (base_model, the LM head,
    token_id_limit): π_ref under LoRA."""

    def __init__(self, policy):
        self.policy, self.token_id_limit = policy, policy.token_id_limit

    def base_model(self, *args, **kwargs):
        with self.policy.adapters.off():
            return self.policy.base_model(*args, **kwargs)

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()


def adapted(model, args):
    """model frozen, with trainable adapters on its body's linear layers (--lora-rank r > 0); else model as it is."""
    if args.lora_rank:
        model.requires_grad_(False)
        model.adapters = Adapters(model.base_model, args.lora_rank, args.lora_alpha, args.lora_targets)
    return model


def load_policies(args, last_save: str | None, device: torch.device, with_ref: bool = True):
    """π_θ, π_ref (None without with_ref) and the tokenizer. Frozen weights (π_ref, a LoRA base) are held in bf16 on
    a GPU, where autocast computes in bf16 anyway: half the memory. Trained ones are float32, which Adam's small
    steps need. With --lora-rank, π_θ is --model frozen with adapters (on --resume its base is still --model and
    the adapters come from the save), and π_ref is the same model with its adapters off: no second copy."""
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.lora_rank:
        policy, tok = load_policy(args.model, device, frozen, args.chat)
        return adapted(policy, args), WithoutAdapters(policy) if with_ref else None, tok
    policy, tok = load_policy(last_save or args.model, device, chat=args.chat)
    ref_policy = load_policy(args.model, device, frozen)[0].requires_grad_(False) if with_ref else None
    return policy, ref_policy, tok


def shard(agent, ref_policy, device: torch.device) -> None:
    """--fsdp: PyTorch's FSDP2 (fully_shard), in place, on each decoder layer of the agent (π_θ, and a separate
    critic's body) and of π_ref, then on each model whole (the root: embeddings, final norm, LM head). A process
    keeps 1/N of every weight, gradient and Adam moment; a layer's weights are gathered just before it runs and
    freed after it, and its gradients reduce-scattered as an average over the processes, as DDP's are all-reduced.
    On a GPU the gathered weights are bf16 (autocast computes the products in bf16 anyway) and gradients are
    reduced in float32; the value head, a unit of its own, stays float32 as without --fsdp."""
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    precision = precision if device.type == "cuda" else MixedPrecisionPolicy()  # a CPU's: the parameters' own
    # V [B, T] is a view of the head's [B, T, 1], which FSDP warns of: nothing writes into it.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view")
    for model in [m for m in (agent, ref_policy) if m is not None]:
        # Hugging Face names the class of a decoder layer in _no_split_modules.
        names = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            sys.exit("error: --fsdp: the model names no decoder layer (_no_split_modules) to shard by")
        for layer in layers:
            fully_shard(layer, mp_policy=precision)
        if getattr(model, "value_head", None) is not None:
            fully_shard(model.value_head)
        fully_shard(model, mp_policy=precision)


@contextlib.contextmanager
def gathered(*models):
    """Inside the block, the whole weights of each model sharded by --fsdp on every process: gathered once, freed
    after (else nothing). Decoding then runs no collective: each process takes its own number of steps (its
    responses may all stop at once, or run to the last token) without another waiting for it, and a step costs no
    all-gather of every layer. Memory: one whole copy of π_θ, and of π_ref, in bf16 on a GPU."""
    roots = [m for m in models if isinstance(m, FSDPModule)]
    units = [unit for root in roots for unit in root.modules() if isinstance(unit, FSDPModule)]
    for root in roots:
        # FSDP takes as its root the first unit to run forward, and the sampler calls the body: a layer first.
        root._get_fsdp_state()._lazy_init()
        root.set_reshard_after_forward(False)  # every unit keeps its weights after its forward
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.set_reshard_after_forward(True)
            root.set_reshard_after_forward(False, recurse=False)  # as fully_shard leaves a root: the backward needs it
        for unit in units:
            unit.reshard()


class Whole:
    """Under --fsdp, what a save keeps of a sharded module or optimizer (of `agent`'s parameters): its state_dict
    as whole tensors on process 0's CPU ({} on the others), and load_state_dict, which shards a whole one again.
    Every process takes part in both."""

    def __init__(self, item, agent):
        self.item, self.agent = item, agent

    def state_dict(self) -> dict:
        if not isinstance(self.item, torch.optim.Optimizer):
            return whole_weights(self.item)
        # Before the first step there is nothing to gather, and get_optimizer_state_dict would take a step at lr 0
        # to make some, which Adam would count.
        if not self.item.state:
            return self.item.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.agent, self.item, options=options)

    def load_state_dict(self, state: dict) -> None:
        options = StateDictOptions(full_state_dict=True)
        if not isinstance(self.item, torch.optim.Optimizer):
            set_model_state_dict(self.item, state, options=options)
        elif not state["state"]:
            self.item.load_state_dict(state)
        else:
            set_optimizer_state_dict(self.agent, self.item, state, options=options)


def whole(agent, **stateful) -> dict:
    """What a save keeps besides the policy (Run.restore's arguments): as they are, or each as Whole under --fsdp."""
    if not isinstance(agent, FSDPModule):
        return stateful
    return {key: None if value is None else Whole(value, agent) for key, value in stateful.items()}


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


LOGITS_PER_CHUNK = 2**25  # 128 MiB in float32: the most of the LM head's output that exists at once


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


class LMHeadLogProbs(torch.autograd.Function):
    """log π(a | s) = z_a/T − logsumexp(z/T) of each token a [N] after each hidden state h(s) [N, H], z = h·Wᵀ + b
    (lm_head_logits), and if asked the entropy H(π(· | s)) = logsumexp(z/T) − E_π[z/T], without gradient. The
    head runs on `columns` ids at a time, joined by a running logsumexp, so no [N, V] tensor exists at once (with
    V = 150,000, a float32 [N, V] takes 0.6 MB per token); the backward pass recomputes each chunk rather than
    keeping it, with ∂log π(a | s)/∂z_j = (1[j = a] − π(j | s))/T. Each chunk's weight gradient is written once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature: float, limit: int, columns: int, dtype, entropy: bool):
        w = weight[:limit].to(dtype)
        b = None if bias is None else bias[:limit]
        n, acc = len(hidden), torch.promote_types(dtype, torch.float32)
        low = torch.finfo(acc).min  # where the running max starts, so that an all −inf chunk gives exp(−inf) = 0
        top, total, weighted, z_a = hidden.new_full((n,), low, dtype=acc), *hidden.new_zeros(3, n, dtype=acc)
        for j in range(0, limit, columns):
            z = lm_head_logits(hidden, w[j : j + columns], None if b is None else b[j : j + columns]).div_(temperature)
            new_top = torch.maximum(top, z.amax(-1))
            e, rescale = (z - new_top[:, None]).exp(), (top - new_top).exp()
            total = total * rescale + e.sum(-1)  # Σ_j exp(z_j/T − top)
            if entropy:  # a −inf logit has probability 0 and adds 0, not 0·(−inf)
                weighted = weighted * rescale + (e * z.clamp(min=low)).sum(-1)  # Σ_j exp(z_j/T − top)·z_j/T
            inside = (tokens >= j) & (tokens < j + z.shape[1])
            z_a = torch.where(inside, z.gather(1, (tokens - j).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), z_a)
            top = new_top
        lse = top + total.log()
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.args = temperature, limit, columns, dtype
        entropies = lse - weighted / total if entropy else lse.new_empty(0)
        ctx.mark_non_differentiable(entropies)
        return z_a - lse, entropies

    @staticmethod
    def backward(ctx, grad_logp, _):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        temperature, limit, columns, dtype = ctx.args
        w, h = weight[:limit].to(dtype), hidden.to(dtype)
        b = None if bias is None else bias[:limit]
        g = grad_logp / temperature
        grad_hidden = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for j in range(0, limit, columns):
            z = lm_head_logits(hidden, w[j : j + columns], None if b is None else b[j : j + columns]).div_(temperature)
            dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # −π(j | s)·g/T ...
            inside = (tokens >= j) & (tokens < j + z.shape[1])
            dz.scatter_add_(1, (tokens - j).clamp(0, z.shape[1] - 1)[:, None], torch.where(inside, g, 0.0)[:, None])
            dz = dz.to(dtype)  # ... + 1[j = a]·g/T
            grad_hidden += product(dz, w[j : j + columns])
            if grad_weight is not None:
                grad_weight[j : j + len(dz.t())] = product(dz.t(), h)
            if grad_bias is not None:
                grad_bias[j : j + len(dz.t())] = dz.sum(0)
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias, *[None] * 6


def response_logprobs(lm_head, hidden, tokens: torch.Tensor, temperature: float, entropy: bool, token_id_limit: int):
    """log π(a | s) of each token a [N] after each hidden state h(s) [N, H] and, if asked, the entropy of
    π(· | s) [N], without gradient (else None), over the ids below token_id_limit, in float32 whatever autocast
    does (LMHeadLogProbs). Give it every response position, padding included: the products then have the
    shape of the micro-batch, never of how many of its tokens are valid, so the same rows give bit for bit the
    same log-probs in any micro-batch of that shape (a GPU picks its kernels, and with them the order of its
    sums, by shape). The entropy is elementwise work over [N, V]: ask for it where it is logged."""
    columns = max(1, LOGITS_PER_CHUNK // max(len(hidden), 1))
    logp, h = LMHeadLogProbs.apply(hidden, lm_head.weight, lm_head.bias, tokens, temperature, token_id_limit, columns,
                                   head_dtype(lm_head, hidden.device), entropy)  # fmt: skip
    return logp, h if entropy else None


# Fixed forever and independent of --seed, so runs sample the same evaluation; the machinery's own, not the task's,
# so that replacing the task block cannot take it away.
EVAL_SAMPLING_SEED = 1234


@torch.no_grad()
def evaluate(policy, tok, args) -> dict:
    """On the task's evaluation prompts: eval_accuracy, the mean `reward` of greedy responses (for a 0/1 reward,
    such as addition's exact match, the share right), and eval_reward_sampled, its mean over responses sampled at
    the training temperature; on the console, what the model writes for the first few (prompt | greedy
    completion | score). The sampled half draws from its own fixed generator: evaluating leaves training as is."""
    prompts, result = eval_prompts(), {}
    for key, greedy in (("eval_accuracy", True), ("eval_reward_sampled", False)):
        gen = torch.Generator(policy.device).manual_seed(EVAL_SAMPLING_SEED)
        size = args.inference_batch_size
        model_prompts = conversations(prompts, args.chat)
        ids, _, prompt_width, mask, finished = sample(policy, tok, model_prompts, args.max_new_tokens, args.temperature,
                                                      size, greedy, gen, args.cuda_graphs)  # fmt: skip
        texts = decode(tok, ids[:, prompt_width:], mask, finished)
        scores = list(map(reward, prompts, texts, finished.tolist()))
        result[key] = sum(scores) / len(prompts)
        if greedy:
            shown = lambda text: repr(text) if len(repr(text)) <= 60 else repr(text)[:59] + "…"
            for prompt, text, score in list(zip(prompts, texts, scores))[:4]:
                print(f"    {shown(prompt)} | {shown(text)} | {score:g}")
    return result


# Sums, means and variances over the valid tokens of every process: batch statistics are global.
def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ of x over every process (x itself without torch.distributed)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def global_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, dist.ReduceOp.MAX)
    return x


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum()  # where, not x·mask: NaN·0 = NaN


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the valid entries of every process."""
    return global_sum(masked_sum(x, mask)) / global_sum(mask.sum())


def floats(row: dict) -> dict:
    return {k: v.item() if torch.is_tensor(v) else v for k, v in row.items()}


# The policy's forward pass (the same in every script).
def token_logprobs(policy, ids, attn, prompt_width: int, temperature: float, entropy: bool = False, states=None):
    """log π_θ(a_t | s_t) of each response token and, if asked, the entropy of π_θ(· | s_t) (no gradient:
    it is only logged; else None), each [B, T] and 0 on padding, from one forward pass with the sampler's
    attention mask, position ids and temperature, so π_θ/π_old is exactly 1 before the first step. `states`
    are h(s_t) from response_states when the caller has them already: a critic on the policy's body reads them."""
    mask = attn[:, prompt_width:].bool()  # the response mask
    hidden = response_states(policy.base_model, ids, attn, prompt_width) if states is None else states
    with autocast(ids.device):
        lm_head, tokens = policy.get_output_embeddings(), ids[:, prompt_width:].flatten()  # every position: see there
        limit = policy.token_id_limit
        logp, entropy = response_logprobs(lm_head, hidden.flatten(0, 1), tokens, temperature, entropy, limit)
    unpack = lambda x: None if x is None else torch.where(mask, x.view(mask.shape), 0.0)
    return unpack(logp), unpack(entropy)


def response_states(body, ids, attn, prompt_width: int) -> torch.Tensor:
    """h(s_t) [B, T, H]: the body's last hidden state at each position that predicts a response token a_t."""
    with autocast(ids.device):
        out = body(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False)
    return out.last_hidden_state[:, prompt_width - 1 : -1]


class PolicyLogProbs(torch.nn.Module):
    """π_θ as a module whose forward is token_logprobs: what DistributedDataParallel wraps."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, ids, attn, prompt_width: int, temperature: float):
        return token_logprobs(self.policy, ids, attn, prompt_width, temperature)


# ==== Below: the plumbing. Command line, processes, the run's folder: the same code in every script. ====
# A copy that only ever runs as one process may delete what torchrun needs: data_parallel (use the module
# itself), start()'s process group, stream_seed (seed with --seed), process_group (run main() under
# one_line_errors alone), whole_weights and, where a script has them, --fsdp's shard, gathered, Whole and whole;
# global_sum and global_max then return their argument, and the update's no_sync is never reached.
def check_args(args: Args, world: int) -> list[tuple[bool, str]]:
    """This script's own bad input: (is it bad, the error line)."""
    flag = lambda name: "--" + name.replace("_", "-")
    at_least_one = ["total_episodes", "num_prompts", "group_size", "max_new_tokens", "ppo_epochs", "num_minibatches"]
    at_least_one += ["micro_batch_size", "inference_batch_size", "eval_every", "max_sampling_rounds"]
    positive = ["learning_rate", "max_grad_norm", "temperature", "clip_range"]
    problems = [(not getattr(args, name) >= 1, f"{flag(name)} must be >= 1") for name in at_least_one]
    problems += [(not getattr(args, name) > 0, f"{flag(name)} must be > 0") for name in positive]
    responses = args.num_prompts // max(world, 1) * args.group_size
    minibatch = responses // args.num_minibatches if args.num_minibatches >= 1 else 0
    return problems + [
        (args.clip_range_high is not None and not args.clip_range_high > 0, "--clip-range-high must be > 0"),
        (not args.kl_coef >= 0, "--kl-coef must be >= 0"),
        (not args.lora_rank >= 0, "--lora-rank must be >= 0"),
        (args.fsdp and world < 2, "--fsdp shards over processes: run it under torchrun --nproc-per-node N (N >= 2)"),
        (args.fsdp and args.lora_rank > 0, "--fsdp does not combine with --lora-rank (LoRA fits 8B on one GPU)"),
        (not args.lora_alpha > 0, "--lora-alpha must be > 0"),
        (
            args.scale_advantages == "group" and args.kl_penalty == "k1-reward" and args.kl_coef > 0,
            "--scale-advantages group with the KL in the reward (--kl-penalty k1-reward) makes a group of equal scores "
            "-(KL_i - mean)/std(KL) whatever --kl-coef is: scale by batch or none, or put the KL in the loss",
        ),
        (args.num_prompts % world != 0, f"--num-prompts {args.num_prompts} must split over {world} processes"),
        (
            args.group_size < 2 and (args.baseline == "leave-one-out" or args.scale_advantages == "group"),
            f"--baseline {args.baseline} and --scale-advantages {args.scale_advantages} need --group-size >= 2",
        ),
        (
            args.num_prompts // max(world, 1) * args.group_size % args.num_minibatches != 0,
            f"--num-prompts {args.num_prompts} x --group-size {args.group_size} must split into --num-minibatches "
            f"{args.num_minibatches}" + (f" over {world} processes" if world > 1 else ""),
        ),
        (
            minibatch % min(args.micro_batch_size, max(minibatch, 1)) != 0,
            f"--micro-batch-size {args.micro_batch_size} must divide the minibatch of {minibatch} responses"
            + (" per process" if world > 1 else "")
            + " (or exceed it)",
        ),
    ]


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
    out = Path(args.output_dir) if args.output_dir else None
    # A run is there once it has written a row or a save; one that stopped before either left nothing to keep.
    held = [name for name in ("metrics.jsonl", "model", "model.old") if out and (out / name).exists()]
    held = [name for name in held if (out / name).stat().st_size and not args.resume]
    problems = check_args(args, world) + [
        (not 0 <= args.seed < 2**32, "--seed must be in [0, 2**32): each process draws from its own stream"),
        (
            args.device not in ("auto", "cpu") and not args.device.startswith("cuda"),
            "--device must be auto, cpu or cuda",
        ),
        (args.device.startswith("cuda") and not torch.cuda.is_available(), f"--device {args.device}: no CUDA here"),
        (out is not None and out.exists() and not out.is_dir(), f"--output-dir {out} is a file, not a folder"),
        (
            bool(held) and not args.overwrite,
            f"--output-dir {out} holds a run ({', '.join(held)}): continue it with --resume {out}, "
            "write to another --output-dir, or replace it with --overwrite",
        ),
    ]
    for bad, message in problems:
        if bad:
            sys.exit(f"error: {message}")
    return args


RUN_FILES = ("args.json", "metrics.jsonl", "model", "model.old", "model.tmp")  # what a run writes in its folder


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


def start(args) -> torch.device:
    """This process's device, and under torchrun its process group: NCCL with one GPU per process, or gloo on
    a CPU. Seeds torch's generator, which draws the responses, with stream_seed: each process samples its own."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
    if cuda and world > 1:  # one GPU per process, made the current one: object collectives put tensors there
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if world > 1:
        # The other processes wait while rank 0 evaluates and saves, which for billions of parameters can take
        # longer than NCCL's default timeout of 10 minutes.
        backend, device_id = ("nccl", device) if cuda else ("gloo", None)
        dist.init_process_group(backend, device_id=device_id, timeout=datetime.timedelta(hours=2))
    torch.manual_seed(stream_seed(args.seed, rank))
    return device


def stream_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s generators: the seed itself for process 0, so that one process draws what it
    always drew, and seed + rank·2³² for the others, which no other (seed, rank) gives while --seed is below 2³²
    (seed + rank made process 1 of seed 1 draw what process 0 of seed 2 draws). Below 2⁶⁴, as torch needs."""
    return seed + rank * 2**32


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose gradients DistributedDataParallel averages over the processes (itself in one process)."""
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy beside them.
    return DistributedDataParallel(module, gradient_as_bucket_view=True) if dist.is_initialized() else module


class Run:
    """The run's folder, which process 0 alone writes: args.json, metrics.jsonl (a row per iteration) and
    model/, saved with what --resume needs in model/training_state.pt. Also `rng`, the generator of the
    prompts (stream_seed), which a save keeps with torch's."""

    active = None  # the run of this process, once made

    def __init__(self, args, name: str, device: torch.device):
        self.args, self.name, self.device = args, name, device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.dir = Path(args.output_dir or f"runs/{name}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.rng = random.Random(stream_seed(args.seed, self.rank))
        self.last_save = str(self.dir / "model") if args.resume else None  # the policy to continue from
        self.first_iteration, self.seconds, self.stateful = 0, 0.0, {}
        self.iteration, Run.active = None, self  # what one_line_errors reports of a non-finite number

    def restore(self, **stateful) -> dict:
        """Name what a save keeps besides the policy (modules and the optimizer, by their state_dict); on
        --resume, load them and the generators from the last save. Returns that save's state ({} if none)."""
        self.stateful = {k: v for k, v in stateful.items() if v is not None}
        if not self.args.resume:
            return {}
        # On the CPU whatever device saved it: load_state_dict moves each tensor to its parameter's device. Mapped,
        # not read: N processes of one machine share one copy (with --fsdp, each reads the whole optimizer state).
        path = self.dir / "model" / "training_state.pt"
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if len(state["rng"]) != self.world:
            sys.exit(f"error: --resume: the run had {len(state['rng'])} processes, not {self.world}")
        for key, value in self.stateful.items():
            value.load_state_dict(state[key])
        python_rng, torch_rng, cuda_rng = state["rng"][self.rank]
        self.rng.setstate(python_rng)
        torch.set_rng_state(torch_rng)
        if self.device.type == "cuda" and cuda_rng is not None:  # else saved on a CPU: the CUDA stream starts anew
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.first_iteration, self.seconds = state["iteration"] + 1, state["seconds"]
        return state

    def iterations(self, num_iterations: int):
        """The iterations still to run, up to num_iterations; iteration 0 measures the starting policy."""
        for iteration in range(self.first_iteration, num_iterations + 1):
            self.iteration = iteration
            yield iteration

    def begin(self, policy, description: str) -> None:
        """Open the folder (rank 0): args.json, and metrics.jsonl with the rows up to the last save when
        resuming (the rows after it will be written again; a line a crash cut short is one of them); with
        --overwrite, the run that was there goes. Print the banner. Starts the clock."""
        if self.rank == 0:
            if self.args.overwrite and not self.args.resume:
                for name in RUN_FILES:
                    path = self.dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "args.json").write_text(json.dumps(asdict(self.args), indent=2))
            kept = []
            for line in (self.dir / "metrics.jsonl").read_text().splitlines() if self.args.resume else []:
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["iteration"] < self.first_iteration:
                        kept.append(line + "\n")
            (self.dir / "metrics.tmp").write_text("".join(kept))
            (self.dir / "metrics.tmp").replace(self.dir / "metrics.jsonl")  # the old rows stay until the new are whole
            self.metrics = open(self.dir / "metrics.jsonl", "a")
            print(
                f"{self.name}: {self.args.model} ({sum(p.numel() for p in policy.parameters()):,} parameters), "
                f"{self.world} x {self.device}\n  {description}"
                + (f", resumed after iteration {self.first_iteration - 1}" if self.args.resume else "")
                + f" -> {self.dir}"
            )
        self.start = self.last_print = time.time() - self.seconds
        self.said_equal_scores = False

    def clock(self) -> float:
        """Wall seconds since training began, resumed runs included."""
        return round(time.time() - self.start, 3)

    def evaluation_due(self, iteration: int, batch_size: int, num_iterations: int) -> bool:
        """Every --eval-every episodes, before the first update (iteration 0) and after the last."""
        episodes, every = iteration * batch_size, self.args.eval_every
        return episodes // every > (episodes - batch_size) // every or iteration in (0, num_iterations)

    def note_equal_scores(self, scores: torch.Tensor, iteration: int) -> None:
        """Say once on the console when every response of a batch scored the same: such a batch teaches
        nothing of the task (responses cut off by --max-new-tokens, or a reward that cannot read them)."""
        low, high = -global_max(-scores.min()), global_max(scores.max())
        if low == high and not self.said_equal_scores and self.rank == 0:
            print(f"note: every response at iteration {iteration} scored {high.item():g}: the batch teaches nothing "
                  "of the task (are the responses cut off, or does the reward not read them?) (said once)")  # fmt: skip
        self.said_equal_scores |= bool(low == high)

    def log(self, row: dict, *shown: str) -> None:
        """Append the row to metrics.jsonl (rank 0), and print the keys `shown` of it at least every 10 s."""
        if self.rank != 0:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if time.time() - self.last_print >= 10 or "eval_accuracy" in row or row["iteration"] == 1:
            self.last_print = time.time()
            value = lambda k: "n/a" if row.get(k) is None else f"{row[k]:.3f}"
            print(
                f"iter {row['iteration']:4d}  episodes {row['episodes']:6d}  "
                + "  ".join(f"{k.removesuffix('_mean')} {value(k)}" for k in shown)
                + f"  {row['episodes'] / (time.time() - self.start):.0f} episodes/s"
                + (f"  eval_accuracy {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else "")
            )

    def save(self, row: dict, policy, tok, **numbers) -> None:
        """Save the policy and, beside it, what --resume needs: the iteration and its clock, `numbers`, the
        state of what restore() named, and every process's generators. The other processes wait, so a
        save is never half-written when training goes on."""
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng_state = (self.rng.getstate(), torch.get_rng_state(), cuda_rng)
        rng_states = [rng_state] * self.world
        if self.world > 1:
            dist.all_gather_object(rng_states, rng_state)
        states = {key: value.state_dict() for key, value in self.stateful.items()}  # by all: a sharded one gathers
        weights = whole_weights(policy)
        if self.rank == 0:
            state = dict(iteration=row["iteration"], seconds=row["seconds"], **numbers, rng=rng_states) | states
            save(policy, tok, self.dir / "model", state, weights)
        if self.world > 1:
            dist.barrier()

    def finish(self) -> None:
        """The closing line: eval accuracy before -> after, wall time and speed."""
        if self.rank == 0:
            self.metrics.close()
            rows = (self.dir / "metrics.jsonl").read_text().splitlines()
            first, last = json.loads(rows[0]), json.loads(rows[-1])
            print(
                f"{self.name}: eval_accuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f} in "
                f"{last['seconds']:.0f}s, {last['episodes'] / max(last['seconds'], 1e-9):.0f} episodes/s; "
                f"model saved to {self.dir / 'model'}"
            )


def whole_weights(model) -> dict | None:
    """The weights of a model sharded by FSDP (ppo.py's and grpo.py's --fsdp), whole, on the CPU of process 0 ({}
    on the others); every process takes part. None for a model that is not sharded."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {}  # tied weights (GPT-2's LM head is its embedding) as one tensor, which save_pretrained writes once
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(parameter), name)]
    return state


def save(policy, tok, path: Path, state: dict, weights: dict | None = None) -> None:
    """The policy (loadable with from_pretrained), with `weights` where given (a sharded policy's, whole), and
    beside it what --resume needs. Written to a temporary folder first, so an interrupted save never destroys the
    previous one."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    adapters = getattr(policy, "adapters", None)  # LoRA: the merged weights, which from_pretrained loads
    policy.save_pretrained(tmp, state_dict=weights if adapters is None else adapters.merged(policy))
    tok.save_pretrained(tmp)
    torch.save(state, tmp / "training_state.pt")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a save stopped before its last step: path is newer
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


@contextlib.contextmanager
def process_group():
    """Under torchrun, the end of the processes. When main() returns, the DistributedDataParallel module, one of
    its locals, is gone with it; once a garbage collection has freed it from any reference cycle, the processes
    meet at a barrier and the group is destroyed. Destroyed while the module lived, the module's reducer held the
    gloo group's last reference and could hang the group's destructor (pytorch/pytorch#56297). A process that
    fails does not wait for the others: it writes its error and exits at once, skipping every clean-up that
    might wait on a collective; that closes its connections, so the collective each other process waits in
    fails within seconds, not at the 2-hour timeout, and those processes exit without an error line of their
    own. Only gloo reports a closed peer so: under NCCL, torchrun stops the others when the first one exits."""
    try:
        yield
    except (Exception, SystemExit) as e:
        if not dist.is_initialized():
            raise
        peer = isinstance(e, RuntimeError) and any(s in str(e) for s in ("by peer", "Broken pipe"))
        if not peer and not isinstance(e, SystemExit):  # one_line_errors has written a SystemExit's line
            sys.excepthook(type(e), e, e.__traceback__)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit((e.code or 0) if isinstance(e, SystemExit) and not isinstance(e.code, str) else 1)
    if dist.is_initialized():
        gc.collect()  # the module, should a reference cycle keep it alive
        dist.barrier()  # waiting releases the GIL, which a gloo thread may need to finish its work
        dist.destroy_process_group()


if __name__ == "__main__":
    with process_group(), one_line_errors():
        main()
