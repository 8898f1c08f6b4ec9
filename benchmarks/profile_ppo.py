"""Where one PPO iteration spends its time, phase by phase.

Runs ppo.py's own main() in-process with a small episode budget, after wrapping the functions
each phase calls in timers (ppo.py itself is left untouched):

  generation   sample() during training                 (the KV-cache sampling loop)
  scoring      decode() and reward()                    (tokens -> text -> task score)
  forward      the policy's and critic's passes without gradients    (π_old, values, π_ref)
  update       the same passes with gradients, backward() and Adam's step, each timed apart
  evaluation, setup: evaluate(), and loading and saving models: not part of an iteration

A timer counts time exclusive of the timed calls nested inside it, so nothing is counted twice;
"other" is the remainder of the wall time (GAE, whitening, statistics, logging). The figures cover
iterations 1..N: ppo.py's iteration 0 (which samples and scores a batch without updating) and its
evaluations, sampling included, stay out.

    python benchmarks/profile_ppo.py                       # ppo.py's defaults, 10 iterations
    python benchmarks/profile_ppo.py --iterations 5 -- --num-prompts 512 --max-new-tokens 12
    python benchmarks/profile_ppo.py --sweep               # iteration cost as batch and length double
    python benchmarks/profile_ppo.py --ops                 # operators of one minibatch step (torch.profiler)
"""

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402

totals: dict[str, float] = defaultdict(float)
_stack: list[list] = []  # [phase, start, time spent in nested timed calls]


def timed(phase_of, fn):
    def wrapper(*args, **kwargs):
        phase = phase_of() if callable(phase_of) else phase_of
        _stack.append([phase, time.perf_counter(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            phase, start, nested = _stack.pop()
            spent = time.perf_counter() - start
            totals[phase] += spent - nested
            if _stack:
                _stack[-1][2] += spent

    return wrapper


evaluations: list[tuple[dict, dict]] = []  # the totals and the clock at the start and at the end of each evaluation


def snapshot() -> dict[str, float]:
    return {"wall": time.perf_counter(), **totals}


def marked(fn):
    def wrapper(*args, **kwargs):
        start = snapshot()
        try:
            return fn(*args, **kwargs)
        finally:
            evaluations.append((start, snapshot()))

    return wrapper


def instrument() -> None:
    ppo.sample = timed("generation", ppo.sample)
    ppo.decode = timed("scoring", ppo.decode)
    ppo.reward = timed("scoring", ppo.reward)
    ppo.reward_model_scores = timed("scoring", ppo.reward_model_scores)
    forward = lambda: "update: forward" if torch.is_grad_enabled() else "forward"
    ppo.PolicyAndCritic.forward = timed(forward, ppo.PolicyAndCritic.forward)  # π_θ and V_φ
    ppo.token_logprobs = timed(forward, ppo.token_logprobs)  # π_ref, and π_θ inside the above
    ppo.evaluate = marked(timed("evaluation", ppo.evaluate))
    ppo.load_policy = timed("setup", ppo.load_policy)
    ppo.load_reward_model = timed("setup", ppo.load_reward_model)
    ppo.save = timed("setup", ppo.save)
    torch.Tensor.backward = timed("update: backward", torch.Tensor.backward)
    torch.optim.Adam.step = timed("update: Adam", torch.optim.Adam.step)


def per_iteration(evaluations: list[tuple[dict, dict]], iterations: int) -> dict[str, float]:
    """Seconds per iteration by phase, from the end of the first evaluation to the start of the last, less
    any evaluation in between. ppo.py evaluates after iteration 0 (which samples and scores a batch without
    updating) and after the last, so this covers iterations 1..N; everything an evaluation does, its own
    sampling included, stays out."""
    (_, first), *between, (last, _) = evaluations
    spent = {k: last.get(k, 0.0) - first.get(k, 0.0) for k in last}
    for start, end in between:
        spent = {k: v - (end.get(k, 0.0) - start.get(k, 0.0)) for k, v in spent.items()}
    phases = {k: v / iterations for k, v in spent.items() if k not in ("wall", "evaluation", "setup") and v > 0}
    phases["other"] = (spent["wall"] - sum(v for k, v in spent.items() if k != "wall")) / iterations
    return phases


def profile(iterations: int, extra: list[str]) -> dict[str, float]:
    """Seconds per iteration by phase, for ppo.py run with `extra` flags (iterations 1..N)."""
    totals.clear()
    evaluations.clear()
    defaults = ppo.Args()
    batch = next((int(extra[i + 1]) for i, a in enumerate(extra) if a == "--num-prompts"), defaults.num_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        budget = ["--total-episodes", str(iterations * batch), "--eval-every", str(10**9)]
        sys.argv = ["ppo.py", *budget, "--output-dir", tmp, *extra]
        ppo.main()
    return per_iteration(evaluations, iterations)


def report(per_iter: dict[str, float], title: str) -> None:
    total = sum(per_iter.values())
    print(f"\n{title}: {total * 1000:.0f} ms per iteration")
    for phase, seconds in sorted(per_iter.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:18s} {seconds * 1000:8.1f} ms  {100 * seconds / total:5.1f}%")


def profile_ops(extra: list[str], steps: int = 20) -> None:
    """The operators behind one minibatch's forward and backward pass in the update, as
    torch.profiler counts them (self time, so nothing is counted twice)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.argv = ["ppo.py", *extra]
    args = ppo.parse_args()
    model, tok = ppo.load_policy(args.model, torch.device("cpu"))
    agent = ppo.PolicyAndCritic(model, torch.nn.Linear(model.config.hidden_size, 1))
    rng = random.Random(args.seed)
    prompts = [ppo.prompt_of(*rng.choice(ppo.TRAIN_PAIRS)) for _ in range(args.num_prompts // args.num_minibatches)]
    ids, attn, prompt_width, *_ = ppo.sample(model, tok, prompts, args.max_new_tokens, args.temperature, len(prompts))

    def step():
        logp, _, values = agent(ids, attn, prompt_width, args.temperature)
        (logp.sum() + values.sum()).backward()

    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"{steps} forward + backward passes of a minibatch {tuple(ids.shape)} of {args.model}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10, help="iterations to average over")
    parser.add_argument("--sweep", action="store_true", help="also double the batch and --max-new-tokens")
    parser.add_argument("extra", nargs="*", help="flags passed to ppo.py (after --)")
    parser.add_argument("--ops", action="store_true", help="only list the operators of one minibatch step")
    args = parser.parse_args()
    if args.ops:
        return profile_ops(args.extra)
    instrument()
    report(profile(args.iterations, args.extra), "ppo.py " + " ".join(args.extra))
    if args.sweep:
        d = ppo.Args()
        rows = []
        for prompts, tokens in [
            (d.num_prompts, d.max_new_tokens),
            (2 * d.num_prompts, d.max_new_tokens),
            (4 * d.num_prompts, d.max_new_tokens),
            (d.num_prompts, 2 * d.max_new_tokens),
            (d.num_prompts, 4 * d.max_new_tokens),
        ]:
            flags = ["--num-prompts", str(prompts), "--max-new-tokens", str(tokens)]
            per_iter = profile(args.iterations, flags)
            rows.append((prompts, tokens, sum(per_iter.values())))
        print("\n| prompts per iteration | --max-new-tokens | ms per iteration | ms per episode |\n|---|---|---|---|")
        for prompts, tokens, seconds in rows:
            print(f"| {prompts} | {tokens} | {seconds * 1000:.0f} | {seconds * 1000 / prompts:.2f} |")


if __name__ == "__main__":
    main()
