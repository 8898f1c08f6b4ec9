"""How much of the return could a critic explain at best?

Samples one response to each of --prompts training prompts, as ppo.py does, then estimates the
true value V(s_t) = E[score | prompt, response[:t]] of every response prefix by --rollouts
continuations sampled from it at the same temperature. The explained variance of the score by
that V, 1 − Var(R − V)/Var(R) over all response tokens (γ = 1, β = 0: the return of every token
is the score), is the ceiling for the `explained_variance` a learned critic reports.

It also fits the best linear value head on the policy's last hidden state, V(s_t) = w·h_t + b by
least squares on 3/4 of the response tokens of --probe-batches fresh batches, and reports the
explained variance on the other quarter: how much of that ceiling a value head on the shared
backbone (ppo.py's and actor_critic.py's default critic) could reach at all.

    python benchmarks/critic_ceiling.py checkpoints/sft-addition runs/ppo-1-.../model
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo  # noqa: E402


def responses(model, tok, rng: random.Random, n: int, max_new_tokens: int, temperature: float):
    """One sampled response to each of n training prompts, as ppo.py samples them, and its score."""
    prompts = [ppo.prompt_of(*rng.choice(ppo.TRAIN_PAIRS)) for _ in range(n)]
    ids, attn, prompt_width, mask, finished = ppo.sample(model, tok, prompts, max_new_tokens, temperature, n)
    texts = ppo.decode(tok, ids[:, prompt_width:], mask, finished)
    scores = list(map(ppo.reward, prompts, texts, finished.tolist()))
    return prompts, ids, attn, prompt_width, mask, texts, scores


def explained_variance(returns: torch.Tensor, values: torch.Tensor) -> float:
    return (1 - (returns - values).var() / returns.var()).item()


@torch.no_grad()
def ceiling(path: str, n_prompts: int, rollouts: int, temperature: float, max_new_tokens: int, seed: int):
    """Response tokens, mean score, and the explained variance of the score by the true V(s_t)."""
    torch.manual_seed(seed)
    model, tok = ppo.load_policy(path, torch.device("cpu"))
    prompts, _, _, _, mask, texts, scores = responses(
        model, tok, random.Random(seed), n_prompts, max_new_tokens, temperature
    )
    values, returns = [], []
    for prompt, text, score, length in zip(prompts, texts, scores, mask.sum(1).tolist()):
        for t in range(length):  # the state before response token t: the prompt and t characters
            prefix = text[:t]  # (one character per token with the embedded tokenizer)
            out, _, n, m, done = ppo.sample(model, tok, [prompt + prefix] * rollouts, max_new_tokens - t, temperature,
                                            rollouts)  # fmt: skip
            rest = ppo.decode(tok, out[:, n:], m, done)
            values.append(sum(ppo.reward(prompt, prefix + r, d) for r, d in zip(rest, done.tolist())) / rollouts)
            returns.append(score)
    r = torch.tensor(returns)
    return len(r), r.mean().item(), explained_variance(r, torch.tensor(values))


@torch.no_grad()
def linear_probe(path: str, batches: int, batch_size: int, temperature: float, max_new_tokens: int, seed: int):
    """Held-out explained variance of the return by the least-squares linear head on h_t."""
    torch.manual_seed(seed)
    model, tok = ppo.load_policy(path, torch.device("cpu"))
    rng = random.Random(seed)
    features, returns = [], []
    for _ in range(batches):
        _, ids, attn, prompt_width, mask, _, scores = responses(
            model, tok, rng, batch_size, max_new_tokens, temperature
        )
        out = model(input_ids=ids, attention_mask=attn, position_ids=ppo.positions(attn), output_hidden_states=True)
        features.append(out.hidden_states[-1][:, prompt_width - 1 : -1][mask])  # h_t: the state before token t
        returns.append(torch.tensor(scores)[:, None].expand_as(mask)[mask])
    x, r = torch.cat(features).double(), torch.cat(returns).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # the bias b
    order = torch.randperm(len(x))
    fit, held_out = order[: 3 * len(x) // 4], order[3 * len(x) // 4 :]
    w = torch.linalg.lstsq(x[fit], r[fit]).solution
    return explained_variance(r[held_out], x[held_out] @ w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders (the embedded tokenizer: one token per character)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rollouts", type=int, default=32, help="continuations per prefix")
    parser.add_argument("--temperature", type=float, default=ppo.Args().temperature)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--probe-batches", type=int, default=16, help="batches of --prompts for the linear head (0: skip)"
    )
    args = parser.parse_args()
    for path in args.models:
        tokens, score, ev = ceiling(
            path, args.prompts, args.rollouts, args.temperature, ppo.Args().max_new_tokens, args.seed
        )
        print(f"{path}: {tokens} response tokens, mean score {score:.3f}, explained variance of the true V {ev:.3f}")
        if args.probe_batches:
            probe = linear_probe(
                path, args.probe_batches, args.prompts, args.temperature, ppo.Args().max_new_tokens, args.seed
            )
            print(f"  best linear head on the last hidden state, held-out explained variance {probe:.3f}")


if __name__ == "__main__":
    main()
