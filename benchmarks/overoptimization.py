"""Reward over-optimisation on the embedded task (Gao et al. 2023), and the KL penalty that holds it off.

Trains a reward model once (reward_model.py: the starting policy's own responses, right beats wrong), then
runs ppo.py against it (--reward-model) with no KL penalty (β = 0), a fixed β and an adaptive β
(--kl-target), and reports for each run the proxy (the reward model's score, normalised to mean 0 and
standard deviation 1 on the starting policy's samples) and the gold (the task's exact reward of the same
responses), against √KL(π‖π_ref) (Gao et al.'s axis) and against episodes: overoptimization.md and .png.

    python benchmarks/overoptimization.py           # a reward model and three PPO runs: about 10 minutes on 2 cores
    python benchmarks/overoptimization.py --quick   # tiny budgets into a temporary directory: a smoke test
    python benchmarks/overoptimization.py --skip-runs   # re-tabulate and re-plot the runs in --runs-dir
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from benchmarks.compare import machine  # noqa: E402

# The three KL settings compared, as ppo.py flags. β = 0.3 held the gold in a shorter pilot (12,800 episodes) where
# β = 0 lost it; 4 nats is past where β = 0's gold peaked (√KL ≈ 1.1), so the controller has room to relax β.
SETTINGS = {
    "β = 0": [],
    "β = 0.3": ["--kl-coef", "0.3"],
    "adaptive β (target 4 nats)": ["--kl-coef", "0.3", "--kl-target", "4", "--kl-horizon", "10000"],
}
FULL = {"total_episodes": 51_200, "eval_every": 3_200, "reward_model": []}
QUICK = {"total_episodes": 64, "eval_every": 32, "reward_model": "--num-pairs 96 --eval-pairs 32 --epochs 1".split()}


@dataclass
class Args:
    """Train a reward model, run PPO against it under three KL settings, tabulate and plot proxy and gold."""

    quick: bool = False
    """tiny budgets, into a temporary directory: a smoke test (what the tests run)"""
    seed: int = 1
    """seed of the reward model and of every PPO run"""
    threads: int = 2
    """OMP_NUM_THREADS for every run (0 = leave the environment alone)"""
    runs_dir: Path | None = None
    """where the reward model and the runs go (None: benchmarks/runs/overoptimization, or a temporary directory)"""
    out_dir: Path | None = None
    """where overoptimization.md and .png go (None: benchmarks/, or the runs directory with --quick)"""
    skip_runs: bool = False
    """run nothing: re-tabulate and re-plot the runs already in --runs-dir"""


def run(script: str, flags: list[str], env: dict) -> float:
    """Run a script to the end in a subprocess; return its wall seconds."""
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / script), *flags], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {script} {shlex.join(flags)} failed:\n{proc.stderr[-2000:]}")
    return time.time() - start


def smooth(xs: list[float], width: int = 8) -> list[float]:
    """Trailing mean over `width` iterations: one batch of 256 responses is noisy."""
    return [statistics.fmean(xs[max(0, i - width + 1) : i + 1]) for i in range(len(xs))]


def load(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def table(runs: dict[str, list[dict]], rm_metrics: dict) -> str:
    lines = [
        "| KL setting | eval accuracy: start → best (at episodes) → end | proxy score, end | gold reward, end "
        "| KL per response, end (√KL) | wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in runs.items():
        evals = [r for r in rows if "eval_accuracy" in r]
        best = max(evals, key=lambda r: r["eval_accuracy"])
        tail = rows[-8:]  # the last 8 iterations: one batch is noisy
        proxy, gold, kl = (statistics.fmean(r[k] for r in tail) for k in ("score_mean", "gold_mean", "kl"))
        lines.append(
            f"| {name} | {evals[0]['eval_accuracy']:.3f} → {best['eval_accuracy']:.3f} ({best['episodes']:,}) → "
            f"{evals[-1]['eval_accuracy']:.3f} | {proxy:+.2f} | {gold:.3f} | {kl:.2f} ({max(kl, 0) ** 0.5:.2f}) | "
            f"{rows[-1]['seconds']:.0f} s |"
        )
    lines += [
        "",
        f"Reward model: held-out pairwise accuracy {rm_metrics['held_out_accuracy_before']:.3f} → "
        f"{rm_metrics['held_out_accuracy']:.3f} on {rm_metrics['eval_pairs']} pairs, trained on "
        f"{rm_metrics['train_pairs']} ({rm_metrics['seconds']:.0f} s).",
    ]
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path) -> bool:
    """Gold and proxy, each against √KL and against episodes; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for (name, rows), color in zip(runs.items(), ("tab:red", "tab:blue", "tab:green")):
        root_kl = [max(k, 0) ** 0.5 for k in smooth([r["kl"] for r in rows])]
        gold, proxy = smooth([r["gold_mean"] for r in rows]), smooth([r["score_mean"] for r in rows])
        evals = [r for r in rows if "eval_accuracy" in r]
        axes[0, 0].plot(root_kl, gold, color=color, label=name)
        axes[0, 1].plot(root_kl, proxy, color=color, label=name)
        axes[1, 0].plot([r["episodes"] for r in evals], [r["eval_accuracy"] for r in evals], color=color, label=name)
        axes[1, 1].plot([r["episodes"] for r in rows], proxy, color=color, label=name)
    for ax, (x, y) in zip(axes.flat, [
        ("√KL(π‖π_ref) of the training batch, √nats", "gold: the task's reward of the batch"),
        ("√KL(π‖π_ref) of the training batch, √nats", "proxy: the reward model's score of the batch"),
        ("episodes", "gold: eval accuracy (greedy, 500 held-out pairs)"),
        ("episodes", "proxy: the reward model's score of the batch"),
    ]):  # fmt: skip
        ax.set(xlabel=x, ylabel=y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("PPO against a learned reward model: the proxy rises, the gold follows only with a KL penalty")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    args = tyro.cli(Args)
    budget = QUICK if args.quick else FULL
    tmp = tempfile.mkdtemp(prefix="overoptimization-") if args.quick and not args.runs_dir else None
    runs_dir = args.runs_dir or Path(tmp or HERE / "runs" / "overoptimization")
    out_dir = args.out_dir or (runs_dir if args.quick else HERE)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"} | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    rm_dir = runs_dir / "reward_model"
    if not args.skip_runs:
        print(f"reward model -> {rm_dir}", flush=True)
        run("reward_model.py", [*budget["reward_model"], "--seed", str(args.seed), "--output-dir", str(rm_dir),
                                   "--overwrite"], env)  # fmt: skip
        for i, (name, flags) in enumerate(SETTINGS.items()):
            flags = [*flags, "--reward-model", str(rm_dir), "--seed", str(args.seed), "--total-episodes",
                     str(budget["total_episodes"]), "--eval-every", str(budget["eval_every"])]  # fmt: skip
            if args.quick:
                flags += ["--num-prompts", "32", "--num-minibatches", "2", "--ppo-epochs", "1"]
            print(f"ppo.py {shlex.join(flags)}", flush=True)
            run("ppo.py", [*flags, "--output-dir", str(runs_dir / f"ppo-{i}"), "--overwrite"], env)
    runs = {name: load(runs_dir / f"ppo-{i}") for i, name in enumerate(SETTINGS)}
    rm_metrics = json.loads((rm_dir / "metrics.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted = plot(runs, out_dir / "overoptimization.png")
    text = "\n".join([
        "# Reward over-optimisation: PPO against a learned reward model",
        "",
        f"Command: `python benchmarks/overoptimization.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine(env)}  ",
        f"Each PPO run: {budget['total_episodes']:,} episodes, an evaluation every {budget['eval_every']:,}, "
        "ppo.py's defaults otherwise; the runs went one after another.",
        "",
        table(runs, rm_metrics),
        "",
        "- *proxy*: the reward model's score (mean 0, standard deviation 1 on the starting policy's samples), "
        "what PPO maximises; *gold*: the task's exact reward of the same training responses (sampled at "
        "temperature 0.5); both the mean of the last 8 iterations, and so is the KL. *eval accuracy*: greedy "
        "exact match on the 500 held-out pairs. The curves are trailing means over 8 iterations.",
        "",
        "![gold and proxy against √KL and episodes](overoptimization.png)" if plotted else "(overoptimization.png "
        "skipped: pip install matplotlib)",
    ])  # fmt: skip
    (out_dir / "overoptimization.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
