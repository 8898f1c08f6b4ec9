"""How much of the return could a critic explain at best?

Samples one response to each of --prompts training prompts, as ppo.py does, then estimates the
true value V(s_t) = E[score | prompt, response[:t]] of every response prefix by --rollouts
continuations sampled from it at the same temperature. The explained variance of the score by
that V, 1 − Var(R − V)/Var(R) over all response tokens (γ = 1, β = 0: the return of every token
is the score), is the ceiling for the `explained_variance` a learned critic reports.

    python benchmarks/critic_ceiling.py checkpoints/sft-addition runs/ppo-1-.../model
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo  # noqa: E402


@torch.no_grad()
def ceiling(path: str, n_prompts: int, rollouts: int, temperature: float, max_new_tokens: int, seed: int):
    torch.manual_seed(seed)
    model, tok = ppo.load_policy(path, torch.device("cpu"))
    rng = random.Random(seed)
    prompts = [ppo.prompt_of(*rng.choice(ppo.TRAIN_PAIRS)) for _ in range(n_prompts)]
    ids, _, n_prompt, mask = ppo.sample(model, tok, prompts, max_new_tokens, temperature)
    texts, finished = ppo.decode(tok, ids[:, n_prompt:], mask)
    values, returns = [], []
    for prompt, text, done, length in zip(prompts, texts, finished, mask.sum(1).tolist()):
        score = ppo.reward(prompt, text, done)
        for t in range(length):  # the state before response token t: the prompt and t characters
            prefix = text[:t]    # (one character per token with the embedded tokenizer)
            out, _, n, m = ppo.sample(model, tok, [prompt + prefix] * rollouts, max_new_tokens - t, temperature)
            rest, rest_done = ppo.decode(tok, out[:, n:], m)
            values.append(sum(ppo.reward(prompt, prefix + r, d) for r, d in zip(rest, rest_done)) / rollouts)
            returns.append(score)
    v, r = torch.tensor(values), torch.tensor(returns)
    return len(r), r.mean().item(), (1 - (r - v).var() / r.var()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders (the embedded tokenizer: one token per character)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rollouts", type=int, default=32, help="continuations per prefix")
    parser.add_argument("--temperature", type=float, default=ppo.Args().temperature)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in args.models:
        tokens, score, ev = ceiling(path, args.prompts, args.rollouts, args.temperature, ppo.Args().max_new_tokens, args.seed)
        print(f"{path}: {tokens} response tokens, mean score {score:.3f}, explained variance of the true V {ev:.3f}")


if __name__ == "__main__":
    main()
