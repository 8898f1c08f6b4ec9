"""Proximal Policy Optimization on a causal language model (Schulman et al. 2017), as used in RLHF
(Ziegler et al. 2019; Ouyang et al. 2022).

Each response is an episode: token a_t is an action in state s_t (the prompt and the tokens before it).
An iteration has two phases.

1. Collect, without gradients: sample a response per prompt and score it; record log π_old (the
   sampler), log π_ref (the frozen starting policy) and the critic's V(s_t). Token t earns

       r_t = −β·log(π_old/π_ref)(a_t | s_t)   (+ the score, on the response's last token)

   and GAE (gae.py) turns rewards and values into advantages A_t and returns R_t = A_t + V(s_t).
2. Update: several epochs of shuffled minibatches, a gradient step on each, ascending

       L(θ) = E_t[ min(r_t(θ)·A_t, clip(r_t(θ), 1 − ε, 1 + ε)·A_t) ],   r_t(θ) = π_θ(a_t|s_t) / π_old(a_t|s_t)

   which stops paying for moving r_t more than ε past 1 in the direction A_t favours, so many steps
   on one batch stay close to the policy that sampled it; the critic regresses V(s_t) on R_t.

    python ppo.py                               # the embedded addition policy, a few minutes on a CPU
    python ppo.py --reward-model runs/rm        # RLHF: a reward model from reward_model.py scores instead
    torchrun --nproc-per-node 8 ppo.py ...      # the same algorithm, data-parallel over 8 GPUs
    torchrun --nproc-per-node 8 ppo.py --fsdp   # the same, each GPU holding 1/8 of the weights and Adam's state
    python ppo.py --resume runs/ppo-1-...       # continue an interrupted run from its last save
    python ppo.py --help

The file, in reading order: Args; the task (`reward` and the prompts: the block to replace for your
own task); PPO's pieces (token_rewards, policy_loss, value_loss, whiten, the KL); main() with the loop;
then, below the banners, the language-model machinery and the plumbing, copied from reinforce.py.
Self-contained on purpose: copy this file and gae.py into your project.

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
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StaticCache,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from gae import gae

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
    total_episodes: int = 102_400
    """sampled responses to train on"""
    eval_every: int = 6_400
    """episodes between evaluations and saves (one also runs before the first update and after the last)"""
    output_dir: str | None = None
    """where metrics.jsonl, args.json and model/ go (None: runs/ppo-<seed>-<time>)"""
    resume: str | None = None
    """continue the run saved in this folder, with its own arguments (give no other flag)"""
    overwrite: bool = False
    """replace the run in --output-dir, if one is there (else a run refuses to start there)"""
    device: str = "auto"
    """auto = cuda when available, else cpu"""
    # ---- Sampling ----
    num_prompts: int = 256
    """prompts per iteration, one response each, over all processes: the batch the update reuses"""
    max_new_tokens: int = 6
    """longest response; one that has not emitted a stop token by then is cut off"""
    temperature: float = 0.5
    """sampling temperature, used identically when computing log-probs"""
    chat: bool = False
    """give each prompt to the model as a user's message, rendered by its tokenizer's chat template"""
    # ---- PPO ----
    learning_rate: float = 3e-5
    """Adam learning rate of policy and critic at the first update; it falls linearly, to lr/N at the last of N"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this"""
    ppo_epochs: int = 4
    """passes over each batch"""
    num_minibatches: int = 4
    """gradient steps per epoch; must divide --num-prompts"""
    clip_range: float = 0.2
    """ε: the ratio π_θ/π_old earns nothing for leaving [1 − ε, 1 + ε]"""
    critic: Literal["shared", "separate"] = "shared"
    """shared: a value head on the policy's backbone; separate: a second backbone initialised from --model"""
    gamma: float = 1.0
    """γ, the discount of GAE"""
    gae_lambda: float = 0.95
    """λ of GAE: 0 = one-step TD error, 1 = Monte Carlo return minus V"""
    value_clip_range: float = 0.2
    """ε_v: a value prediction earns nothing for moving more than this from V_old"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    # ---- KL and reward ----
    kl_coef: float = 0.0
    """β: every token earns −β·log(π_old/π_ref); the starting β when --kl-target is set"""
    kl_target: float | None = None
    """adapt β so the mean KL(π‖π_ref) per response approaches this, in nats (None = fixed β)"""
    kl_horizon: int = 10_000
    """episodes over which the adaptive β can grow or shrink by its clip of 20%"""
    missing_eos_penalty: float = 0.0
    """subtract this from the score of responses cut off before a stop token"""
    reward_model: str | None = None
    """score the sampled ids with this AutoModelForSequenceClassification (one label, the policy's vocabulary)"""
    # ---- Memory ----
    micro_batch_size: int = 64
    """responses per forward/backward pass of the update; gradients accumulate over micro-batches"""
    inference_batch_size: int = 256
    """responses per pass without gradients: sampling, π_ref, the reward model, evaluation (π_old and V_old take the
    update's micro-batches)"""
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
    """under torchrun, shard the weights, gradients and Adam's state of π_θ (and the critic) and π_ref over the
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


# ==== PPO. Token tensors are [B, T] over response tokens, masks bool; padding may hold anything, NaN included. ====
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


def token_rewards(scores: torch.Tensor, response_mask: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β·KL_t on every response token (KL_t, given as `kl`: k1 of the policy that sampled), plus the
    score on the last one: the stop token, or the last token of a cut-off response. [B, T], 0 on padding. The
    penalty per token tells the critic where the divergence happened; the score only exists once the response
    does."""
    last = response_mask.sum(1, keepdim=True) - 1
    rewards = torch.where(response_mask, -kl_coef * kl, 0.0)
    return rewards.scatter_add(1, last, scores[:, None].to(rewards.dtype))


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x − mean)/std over the valid tokens of the whole batch (every process), 0 on padding. One scale for
    all responses keeps their advantages comparable and the step size independent of the reward's units."""
    return torch.where(mask, (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + 1e-8), 0.0)


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """Per token −min(r_t·A_t, clip(r_t, 1 − ε, 1 + ε)·A_t), and r_t. The min keeps the objective
    a pessimistic bound on the unclipped one: clipping removes the incentive to move r_t further in
    the direction A_t favours, never the penalty for moving it the wrong way."""
    ratio = torch.exp(logp - logp_old)  # r_t = π_θ/π_old, from log-probs: no division by tiny π_old
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages), ratio


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, clip_range: float):
    """Per token 0.5·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²): like the policy, the
    critic gains nothing from moving more than ε_v away from the values it had when sampling."""
    clipped = values.clamp(values_old - clip_range, values_old + clip_range)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def adaptive_kl_coef(beta: float, kl: float, target: float, n_episodes: int, horizon: int) -> float:
    """Ziegler et al. (2019): β ← β·(1 + e·n/horizon), e = clip(KL/target − 1, −0.2, 0.2).
    A proportional controller: more KL than the target raises the penalty, less lowers it; the clip
    bounds the change per episode, so an outlier batch cannot swing β."""
    e = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + e * n_episodes / horizon)


@torch.no_grad()
def rollout(agent, tok, prompts: list[str], args: Args, ref_policy, reward_model=None) -> tuple[dict, int]:
    """Phase 1 of an iteration: a response to each prompt from π_old, its score (the reward model's, or
    `reward`'s) and its gold reward (`reward`'s, the task's own), and π_old, π_ref, V_old and the entropy of
    π_old on its tokens. Returns the batch, a dict of tensors with a row per response, and the prompt width."""
    size, temperature = args.inference_batch_size, args.temperature
    model_prompts = conversations(prompts, args.chat)  # with --chat, each a user's message
    ids, attn, prompt_width, mask, finished = sample(
        agent.policy, tok, model_prompts, args.max_new_tokens, temperature, size, cuda_graph=args.cuda_graphs
    )
    texts = decode(tok, ids[:, prompt_width:], mask, finished)
    gold = torch.tensor(list(map(reward, prompts, texts, finished.tolist())), device=ids.device)
    scores = gold if reward_model is None else reward_model_scores(reward_model, ids, attn, size)
    batch = dict(ids=ids, attn=attn, mask=mask, scores=scores - args.missing_eos_penalty * ~finished, gold=gold)
    # π_old in passes of the update's micro-batch shape: the same kernels, so r_t = 1 exactly before the first step.
    rows = min(args.micro_batch_size, len(prompts) // args.num_minibatches)
    micro = [slice(i, i + rows) for i in range(0, len(prompts), rows)]
    passes = [agent(ids[c], attn[c], prompt_width, temperature, entropy=True) for c in micro]
    batch["logp_old"], batch["entropy"], batch["values_old"] = (torch.cat(x) for x in zip(*passes))
    chunks = [slice(i, i + size) for i in range(0, len(prompts), size)]
    logp_ref = [token_logprobs(ref_policy, ids[c], attn[c], prompt_width, temperature)[0] for c in chunks]
    batch["logp_ref"] = torch.cat(logp_ref)
    return batch, prompt_width


def update_minibatch(learner, optimizer, minibatch: dict, prompt_width: int, args: Args):
    """One gradient step on a minibatch (this process's share: a dict of [b, ...] tensors), summed over
    micro-batches. The loss is the mean over the valid tokens of the whole minibatch, on every process:
    each token is an action with its own A_t, weighted alike whatever its response's length, so neither
    the micro-batch size nor the number of processes changes the step. Returns the gradient norm and,
    per micro-batch, the token mask and r_t, A_t and the two losses, for the log. A gradient that is
    not finite is never stepped on: FloatingPointError."""
    n_tokens = global_sum(minibatch["mask"].sum())
    # DistributedDataParallel averages gradients over processes, as FSDP does; the loss is a sum over them.
    world = dist.get_world_size() if dist.is_initialized() else 1
    micro = [
        {k: v[i : i + args.micro_batch_size] for k, v in minibatch.items()}
        for i in range(0, len(minibatch["mask"]), args.micro_batch_size)
    ]
    optimizer.zero_grad(set_to_none=True)
    logged = []
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1 or not isinstance(learner, DistributedDataParallel)  # average once, at the end
        with contextlib.nullcontext() if sync else learner.no_sync():
            logp, _, values = learner(mb["ids"], mb["attn"], prompt_width, args.temperature)
            pg_loss, ratio = policy_loss(logp, mb["logp_old"], mb["advantages"], args.clip_range)
            vf_loss = value_loss(values, mb["values_old"], mb["returns"], args.value_clip_range)
            loss = masked_sum(pg_loss, mb["mask"]) + args.vf_coef * masked_sum(vf_loss, mb["mask"])
            (loss * world / n_tokens).backward()
        logged.append((mb["mask"], ratio.detach(), mb["advantages"], pg_loss.detach(), vf_loss.detach()))
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # --fsdp: every shard's
    if not torch.isfinite(grad_norm):
        raise FloatingPointError("non-finite gradient")
    optimizer.step()
    return grad_norm, logged


# ==== Training ====
def main() -> None:
    args = parse_args()
    args.cuda_graphs &= not args.fsdp  # a graph would capture FSDP's hooks, which wait on its own CUDA streams
    device = start(args)  # the process group under torchrun, this process's device, its seed
    run = Run(args, "ppo", device)  # the output folder and the prompts' generator; on --resume, the last save
    policy, ref_policy, tok = load_policies(args, run.last_save, device)  # π_θ and the frozen π_ref: see there
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32  # a frozen model's dtype, as there
    reward_model = load_reward_model(args.reward_model, device, frozen, tok) if args.reward_model else None
    critic = None
    if args.critic == "separate":  # a second body, as --model; with --lora-rank, frozen with adapters of its own
        body = load_policy(args.model, device, frozen if args.lora_rank else torch.float32)[0].base_model  # no LM head
        critic = adapted(body, args)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1, device=device)
    torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)  # V = 0: no prior about rewards
    if args.gradient_checkpointing:  # non-reentrant: the recompute runs in the backward pass
        for m in [m for m in (policy, critic) if m is not None]:
            m.activation_checkpointing_enable()
    agent = PolicyAndCritic(policy, value_head, critic)  # π_θ and V_φ: what Adam steps
    if args.fsdp:  # each process keeps a shard of every weight, before Adam is given them (see shard)
        shard(agent, ref_policy, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, fused=True)  # one kernel for all
    adapters = getattr(policy, "adapters", None)  # with --lora-rank: what trains in π_θ
    saved = run.restore(**whole(agent, value_head=value_head, critic=critic, adapters=adapters, optimizer=optimizer))
    beta = saved.get("beta", args.kl_coef)  # β
    learner = agent if args.fsdp else data_parallel(agent)  # the agent, its gradients averaged over processes
    batch_size, local_batch = args.num_prompts, args.num_prompts // run.world
    num_iterations = math.ceil(args.total_episodes / batch_size)
    run.begin(
        policy,
        f"{num_iterations} iterations x {batch_size} episodes, {args.ppo_epochs} epochs x "
        f"{args.num_minibatches} minibatches, {args.critic} critic, kl_coef {args.kl_coef}"
        + (f" -> target {args.kl_target}" if args.kl_target else "")
        + (f", LoRA rank {args.lora_rank} on {len(adapters.layers)} layers" if adapters else ""),
    )

    # Iteration 0 measures the starting policy as every later iteration measures its own, and does not update.
    for iteration in run.iterations(num_iterations):
        # 1. Collect: one response per prompt, its score, and π_old, π_ref and V_old on its tokens. (With --fsdp, the
        #    weights are gathered once for it: see gathered.)
        prompts = train_prompts(run.rng, local_batch)
        with gathered(agent, ref_policy):
            batch, prompt_width = rollout(agent, tok, prompts, args, ref_policy, reward_model)
        run.note_equal_scores(batch["scores"], iteration)

        # 2. Advantages: GAE on r_t = −β·KL_t (+ the score), whitened after the returns are taken, so the
        #    critic's targets keep their scale.
        mask = batch["mask"]
        rewards = token_rewards(batch["scores"], mask, kl_penalty(batch["logp_old"], batch["logp_ref"], "k1"), beta)
        advantages, returns = gae(rewards, batch["values_old"], mask, args.gamma, args.gae_lambda)  # R = A + V
        batch.update(advantages=whiten(advantages, mask), returns=returns)

        # 3. Update (not at iteration 0): epochs x shuffled minibatches, one Adam step each. The learning
        #    rate falls linearly from lr at the first update to lr/N at the last (CleanRL's --anneal-lr), so the
        #    last batches move the policy little and the saved model is not a noisy snapshot.
        steps = []
        if iteration > 0:
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * (1 - (iteration - 1) / num_iterations)
            learner.train()  # only gradient checkpointing cares: dropout is off
            for epoch in range(args.ppo_epochs):
                for idx in torch.randperm(local_batch, device=device).split(local_batch // args.num_minibatches):
                    minibatch = {k: v[idx] for k, v in batch.items()}
                    steps.append(update_minibatch(learner, optimizer, minibatch, prompt_width, args))
            learner.eval()

        # 4. Log and adapt β; evaluate and save every --eval-every episodes (rank 0 evaluates alone).
        row = {"iteration": iteration, "episodes": iteration * batch_size, "seconds": run.clock(), "beta": beta}
        row |= batch_stats(batch, rewards, returns) | (update_stats(steps) if steps else {})
        if args.kl_target is not None:  # the next batch's β, from this batch's KL per response
            beta = adaptive_kl_coef(beta, row["kl"], args.kl_target, batch_size, args.kl_horizon)
        due = run.evaluation_due(iteration, batch_size, num_iterations)
        if due:
            with gathered(agent):  # by every process under --fsdp; rank 0 evaluates alone
                row |= evaluate(policy, tok, args) if run.rank == 0 else {}
        run.log(row, "reward_mean", "kl", "entropy", "clip_fraction", "explained_variance")
        if due:  # after the row: a resume redoes everything after its last save
            run.save(row, policy, tok, beta=beta)
    run.finish()


def batch_stats(batch: dict, rewards: torch.Tensor, returns: torch.Tensor) -> dict:
    """What the log says of a batch of responses, over every process."""
    mask, n = batch["mask"], global_sum(torch.tensor(len(batch["mask"]), device=batch["mask"].device))
    kl_k1, kl_k3 = (
        global_sum(masked_sum(kl_penalty(batch["logp_old"], batch["logp_ref"], k), mask)) / n for k in ("k1", "k3")
    )
    var_returns = masked_var(returns, mask)
    # How much of the return the critic foresaw; undefined when every return is equal.
    explained = 1 - masked_var(returns - batch["values_old"], mask) / var_returns if var_returns > 0 else None
    stats = {
        "reward_mean": global_sum(masked_sum(rewards, mask)) / n,  # score − β·KL, per response
        "score_mean": global_sum(batch["scores"].sum()) / n,  # what the policy is trained on
        "gold_mean": global_sum(batch["gold"].sum()) / n,  # the task's own reward of the same responses
        "kl": kl_k1,  # KL(π_old‖π_ref) per response, in nats: k1, the estimator in the reward
        "kl_k3": kl_k3,  # the same KL by k3: never negative, lower variance
        "entropy": masked_mean(batch["entropy"], mask),
        "response_length": global_sum(mask.sum()) / n,
        "explained_variance": explained,
    }
    return floats(stats)


def update_stats(steps: list) -> dict:
    """Token means over every micro-batch of every step of an update, over every process."""
    grad_norms = [grad_norm for grad_norm, _ in steps]
    micro = [mb for _, logged in steps for mb in logged]
    mask, ratio, advantages, pg_loss, vf_loss = (torch.cat(x) for x in zip(*micro))
    first_mask, first_ratio = (torch.cat(x) for x in list(zip(*steps[0][1]))[:2])
    log_ratio = ratio.log()
    stats = {
        "policy_loss": masked_mean(pg_loss, mask),
        "value_loss": masked_mean(vf_loss, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": global_max(ratio[mask].max()),
        # The share of tokens where the clip binds: the clipped term is the smaller (TRL's and lm-human-preferences'
        # definition; CleanRL counts |r − 1| > ε, which also counts tokens whose unclipped term is the min).
        "clip_fraction": masked_mean((pg_loss > -ratio * advantages).float(), mask),
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


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def floats(row: dict) -> dict:
    return {k: v.item() if torch.is_tensor(v) else v for k, v in row.items()}


# The policy's forward pass (the same in every script), and the value head's (as in actor_critic.py).
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


class PolicyAndCritic(torch.nn.Module):
    """π_θ and V_φ as one module: what the optimizer steps and what DistributedDataParallel averages."""

    def __init__(self, policy, value_head: torch.nn.Linear, critic=None):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic

    def forward(self, ids, attn, prompt_width: int, temperature: float, entropy: bool = False):
        """token_logprobs' log π_θ and entropy, and V_φ(s_t) [B, T] from the last hidden state of the critic:
        the policy's own body (critic None: one pass for both) or a separate one."""
        states = response_states(self.policy.base_model, ids, attn, prompt_width)
        logp, entropy = token_logprobs(self.policy, ids, attn, prompt_width, temperature, entropy, states)
        if self.critic is not None:
            states = response_states(self.critic, ids, attn, prompt_width)
        return logp, entropy, self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1)


def load_reward_model(path: str, device: torch.device, dtype: torch.dtype, policy_tok):
    """A sequence classifier with one output and its `score` head on the last hidden state, which reads the
    token ids the policy samples: its tokenizer must have the policy's vocabulary."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load --reward-model {path}: {str(e).splitlines()[0]}")
    if model.config.num_labels != 1:
        sys.exit(f"error: --reward-model {path} has {model.config.num_labels} labels; a reward model has 1")
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        sys.exit(f"error: --reward-model {path} has no `score` head on its last hidden state")
    if tok.get_vocab() != policy_tok.get_vocab():
        sys.exit(f"error: --reward-model {path} has another vocabulary than the policy: it reads the ids sampled")
    return model.eval().requires_grad_(False)


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


# ==== Below: the plumbing. Command line, processes, the run's folder: the same code in every script. ====
# A copy that only ever runs as one process may delete what torchrun needs: data_parallel (use the module
# itself), start()'s process group, stream_seed (seed with --seed), process_group (run main() under
# one_line_errors alone), whole_weights and, where a script has them, --fsdp's shard, gathered, Whole and whole;
# global_sum and global_max then return their argument, and the update's no_sync is never reached.
def check_args(args: Args, world: int) -> list[tuple[bool, str]]:
    """This script's own bad input: (is it bad, the error line)."""
    minibatch = args.num_prompts // (args.num_minibatches * world) if args.num_minibatches >= 1 else 0
    flag = lambda name: "--" + name.replace("_", "-")
    at_least_one = ["total_episodes", "num_prompts", "max_new_tokens", "ppo_epochs", "num_minibatches"]
    at_least_one += ["micro_batch_size", "inference_batch_size", "eval_every"]
    positive = ["learning_rate", "max_grad_norm", "temperature", "clip_range", "value_clip_range", "vf_coef"]
    problems = [(not getattr(args, name) >= 1, f"{flag(name)} must be >= 1") for name in at_least_one]
    problems += [(not getattr(args, name) > 0, f"{flag(name)} must be > 0") for name in positive]
    return problems + [
        (not args.kl_coef >= 0, "--kl-coef must be >= 0"),
        (not args.lora_rank >= 0, "--lora-rank must be >= 0"),
        (not args.lora_alpha > 0, "--lora-alpha must be > 0"),
        (args.fsdp and world < 2, "--fsdp shards over processes: run it under torchrun --nproc-per-node N (N >= 2)"),
        (args.fsdp and args.lora_rank > 0, "--fsdp does not combine with --lora-rank (LoRA fits 8B on one GPU)"),
        (args.kl_target is not None and not args.kl_target > 0, "--kl-target must be > 0"),
        (args.kl_target is not None and not args.kl_coef > 0, "--kl-target needs a starting --kl-coef > 0"),
        (not args.kl_horizon > 0.2 * args.num_prompts, "--kl-horizon must exceed 0.2 x --num-prompts, or β can hit 0"),
        (not args.missing_eos_penalty >= 0, "--missing-eos-penalty must be >= 0"),
        (not 0 <= args.gamma <= 1, "--gamma must be in [0, 1]"),
        (not 0 <= args.gae_lambda <= 1, "--gae-lambda must be in [0, 1]"),
        (
            args.num_prompts % (args.num_minibatches * world) != 0,
            f"--num-prompts {args.num_prompts} must split into --num-minibatches {args.num_minibatches}"
            + (f" over {world} processes" if world > 1 else ""),
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
