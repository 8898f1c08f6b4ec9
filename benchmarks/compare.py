"""REINFORCE, actor-critic, PPO and GRPO learning the default task side by side.

Runs reinforce.py, actor_critic.py, ppo.py and grpo.py as subprocesses, each with its own defaults except a
common episode budget and evaluation interval, over several seeds, reads each run's metrics.jsonl
and reports, per algorithm:
  - episodes and wall seconds until the eval accuracy (greedy, on the 500 held-out pairs) first
    reaches 0.5 / 0.8 / 0.95, the final eval accuracy (mean ± std over seeds), episodes per
    second, and the peak resident memory of a run: a Markdown table in results.md, also printed;
  - the learning curves, eval accuracy against episodes and against wall seconds, mean over seeds
    with the min..max range shaded: curves.png (needs matplotlib: pip install matplotlib).

    python benchmarks/compare.py               # 4 algorithms x seeds 1 2 3 x 102,400 episodes: 40 min on 2 cores
    python benchmarks/compare.py --quick       # 1 seed x 512 episodes into a temporary directory: a smoke test
    python benchmarks/compare.py --skip-runs   # re-tabulate and re-plot the runs already in --runs-dir
    python benchmarks/compare.py --algos ppo reinforce --seeds 4 5

The runs go one after another, never in parallel: the reference machine has 2 cores, and runs
sharing them would slow each other down and make the wall-clock columns meaningless.
"""

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALGOS = ("reinforce", "actor_critic", "ppo", "grpo")
COLORS = {"reinforce": "tab:blue", "actor_critic": "tab:orange", "ppo": "tab:green", "grpo": "tab:red"}
THRESHOLDS = (0.5, 0.8, 0.95)
# A common budget: ppo.py's default, a whole number of batches for all four scripts (400 of 256 episodes, 1,600
# of actor_critic.py's 64), with an evaluation every 6,400 episodes as ppo.py and grpo.py do, so that each
# curve has 17 points.
FULL = {"seeds": (1, 2, 3), "total_episodes": 102_400, "eval_every": 6_400}
QUICK = {"seeds": (1,), "total_episodes": 512, "eval_every": 256}


@dataclass
class Args:
    """Run reinforce.py, actor_critic.py, ppo.py and grpo.py on the same budget; tabulate and plot them."""

    algos: tuple[Literal["reinforce", "actor_critic", "ppo", "grpo"], ...] = ALGOS
    """the scripts to run and compare"""
    seeds: tuple[int, ...] | None = None
    """the seeds to run each script with (None: 1 2 3, or 1 with --quick)"""
    total_episodes: int | None = None
    """episode budget of every run (None: 102,400, ppo.py's default, or 512 with --quick)"""
    eval_every: int | None = None
    """episodes between evaluations (None: 6,400, as ppo.py and grpo.py evaluate, or 256 with --quick)"""
    quick: bool = False
    """one seed and a small budget, into a temporary directory: a smoke test (what the tests run)"""
    # One thread by default: with a 600k-parameter model and batches of 64-256 short responses, each op
    # is too small for intra-op threads to repay their synchronisation; a second thread on a busy 2-core
    # machine waits for a core; and one thread makes wall times comparable across machines and the same
    # as in the tests.
    threads: int = 1
    """OMP_NUM_THREADS for every run, so torch's thread count (0 = leave the environment alone)"""
    runs_dir: Path | None = None
    """where the runs go, one <algo>-<seed>/ each (None: benchmarks/runs, or a temporary directory with --quick)"""
    out_dir: Path | None = None
    """where results.md and curves.png go (None: benchmarks/, or the runs directory with --quick)"""
    skip_runs: bool = False
    """run nothing: re-tabulate and re-plot the runs already in --runs-dir"""


# ---- Running ----
def machine(env: dict) -> str:
    """CPU model, cores and the torch threads and device a run gets (asked of a child with the runs' env)."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():  # platform.processor() is often empty or just "x86_64" on Linux
        models = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # = nproc
    probe = (
        "import torch; print(torch.get_num_threads(), torch.__version__, "
        "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    )
    threads, version, gpu = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=2)
    return (
        f"{cpu}, {cores} cores (nproc), {gpu.strip()}; torch {version} with {threads} thread(s) per run "
        f"(OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}); Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def run(algo: str, seed: int, run_dir: Path, total_episodes: int, eval_every: int, env: dict) -> float:
    """Run one script to completion, echoing its console and saving it to run_dir/console.log.
    Returns and saves (run_dir/rusage.json) the peak resident memory of its process in MiB."""
    cmd = [
        sys.executable,
        str(ROOT / f"{algo}.py"),
        "--seed",
        str(seed),
        "--total-episodes",
        str(total_episodes),
        "--eval-every",
        str(eval_every),
        "--output-dir",
        str(run_dir),
        "--overwrite",  # a run of an earlier comparison in the same place is replaced
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "console.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for line in proc.stdout:
            log.write(line)
            print("    " + line, end="", flush=True)
        proc.stdout.close()
        # os.wait4 rather than proc.wait(): it also returns this child's own resource usage, so
        # ru_maxrss is this run's peak (RUSAGE_CHILDREN would be the max over every run so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it has been reaped
    if proc.returncode != 0:
        sys.exit(f"error: {algo} seed {seed} failed (exit status {proc.returncode}); see {run_dir / 'console.log'}")
    peak_mib = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    (run_dir / "rusage.json").write_text(json.dumps({"peak_rss_mib": round(peak_mib, 1)}) + "\n")
    return peak_mib


def load(run_dir: Path) -> dict:
    """A finished run: its metrics rows, args.json and peak memory (None when not recorded)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        sys.exit(f"error: no {metrics}; run without --skip-runs first")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rusage = run_dir / "rusage.json"
    return {
        "rows": rows,
        "args": json.loads((run_dir / "args.json").read_text()),
        "peak_rss_mib": json.loads(rusage.read_text())["peak_rss_mib"] if rusage.exists() else None,
    }


# ---- Tabulating ----
def evals(rows: list[dict]) -> list[dict]:
    """The rows that follow an evaluation (row 0, the starting policy, is one)."""
    return [r for r in rows if "eval_accuracy" in r]


def first_reach(rows: list[dict], threshold: float) -> tuple[int, float] | None:
    """(episodes, seconds) at the first evaluation whose accuracy is >= threshold; None if none is."""
    return next(((r["episodes"], r["seconds"]) for r in evals(rows) if r["eval_accuracy"] >= threshold), None)


def reach_cell(runs: list[dict], threshold: float) -> str:
    """Episodes and seconds to the threshold, mean over the seeds that reached it, saying how many
    did when not all; — when none did."""
    hits = [h for h in (first_reach(r["rows"], threshold) for r in runs) if h is not None]
    if not hits:
        return "—"
    episodes, seconds = (statistics.mean(x) for x in zip(*hits))
    return f"{episodes:,.0f} ep · {seconds:,.0f} s" + (
        f" ({len(hits)}/{len(runs)} seeds)" if len(hits) < len(runs) else ""
    )


def mean_std(xs: list[float], fmt: str = ".3f") -> str:
    """'mean ± std' over seeds (sample std, n − 1); only the mean for a single seed."""
    return f"{statistics.mean(xs):{fmt}}" + (f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else "")


def table(results: dict[str, list[dict]]) -> str:
    """One Markdown row per algorithm, aggregated over its seeds' runs."""
    lines = [
        "| algorithm | seeds | "
        + " | ".join(f"to {t} accuracy" for t in THRESHOLDS)
        + " | final accuracy | episodes/s | peak RSS (MiB) |",
        "|---|---|" + "---|" * len(THRESHOLDS) + "---|---|---|",
    ]
    for algo, runs in results.items():
        final = [evals(r["rows"])[-1]["eval_accuracy"] for r in runs]
        speed = [r["rows"][-1]["episodes"] / r["rows"][-1]["seconds"] for r in runs]
        peaks = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"] is not None]
        lines.append(
            f"| {algo} | {len(runs)} | "
            + " | ".join(reach_cell(runs, t) for t in THRESHOLDS)
            + f" | {mean_std(final)} | {statistics.mean(speed):,.0f} | {f'{max(peaks):,.0f}' if peaks else '?'} |"
        )
    return "\n".join(lines)


def report(results: dict[str, list[dict]], meta: dict, plotted: bool) -> str:
    """results.md: how the runs were made, the table, what its columns mean, and the curves."""
    first = next(iter(results.values()))[0]
    start = statistics.mean(evals(r["rows"])[0]["eval_accuracy"] for runs in results.values() for r in runs)
    return "\n".join(
        [
            "# REINFORCE, actor-critic, PPO and GRPO on two-digit addition",
            "",
            f"Command: `{meta['command']}`  ",
            f"Machine: {meta['machine']}  ",
            f"Each run: {first['args']['total_episodes']:,} episodes, an evaluation every "
            f"{first['args']['eval_every']:,} episodes, every other flag at the script's default; the runs went one "
            "after another.",
            "",
            table(results),
            "",
            f"- *to X accuracy*: episodes and wall seconds until the eval accuracy (greedy, 500 held-out pairs) "
            f"first reached X, mean over the seeds that reached it (n/k seeds when not all did; — when none did). "
            f"The starting checkpoint scores {start:.3f}.",
            "- *wall seconds*: each script's own `seconds`, since its training loop began, evaluations included, "
            "start-up and model loading not.",
            "- *final accuracy*: at the last evaluation, mean ± sample std over seeds.",
            "- *episodes/s*: total episodes / the last row's `seconds`, mean over seeds; that time includes every "
            "evaluation but the last, the same number for each algorithm.",
            "- *peak RSS*: the largest resident memory of a run's process (ru_maxrss from os.wait4), max over seeds.",
            "",
            "![eval accuracy against episodes and against wall seconds](curves.png)"
            if plotted
            else "(curves.png was not drawn: matplotlib is not installed)",
            "",
        ]
    )


# ---- Plotting ----
def plot(results: dict[str, list[dict]], path: Path) -> bool:
    """Two panels, eval accuracy against episodes and against wall seconds: one line per algorithm
    (mean over seeds), the seeds' min..max shaded. False, and a line saying so, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # write files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for algo, runs in results.items():
        curves = [evals(r["rows"]) for r in runs]
        n = min(map(len, curves))  # the seeds share one evaluation schedule; the shortest bounds it anyway
        acc = [[c[i]["eval_accuracy"] for c in curves] for i in range(n)]
        mean, lo, hi = ([f(a) for a in acc] for f in (statistics.mean, min, max))
        for ax, key in zip(axes, ("episodes", "seconds")):
            # Point i is the i-th evaluation; on the time axis it sits at the seeds' mean time.
            x = [statistics.mean(c[i][key] for c in curves) for i in range(n)]
            label = (
                f"{algo} ({len(runs)} seed{'s' * (len(runs) > 1)})" if key == "episodes" else None
            )  # one legend entry
            ax.plot(x, mean, marker="o", markersize=3, color=COLORS[algo], label=label)
            ax.fill_between(x, lo, hi, color=COLORS[algo], alpha=0.2, linewidth=0)
    for ax in axes:
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", linewidth=0.6, linestyle=":")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter("{x:,.0f}")
    axes[0].set(
        xlabel="episodes (responses trained on)", ylabel="eval accuracy (greedy, 500 held-out pairs)", ylim=(None, 1)
    )
    axes[1].set(xlabel="wall seconds (evaluations included)")
    fig.legend(loc="outside lower center", ncols=len(results))  # below the panels: never over a curve
    fig.suptitle("Two-digit addition: mean over seeds, min..max shaded")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    args = tyro.cli(Args)
    preset = QUICK if args.quick else FULL
    seeds, total_episodes, eval_every = (
        preset[k] if getattr(args, k) is None else getattr(args, k) for k in ("seeds", "total_episodes", "eval_every")
    )
    for bad, message in [
        (not args.algos, "--algos needs at least one script"),
        (not seeds, "--seeds needs at least one seed"),
        (total_episodes < 1, "--total-episodes must be >= 1"),
        (eval_every < 1, "--eval-every must be >= 1"),
        (args.threads < 0, "--threads must be >= 0"),
        (args.skip_runs and args.runs_dir is None and args.quick, "--skip-runs with --quick needs --runs-dir"),
    ]:
        if bad:
            sys.exit(f"error: {message}")
    runs_dir = (
        args.runs_dir or (Path(tempfile.mkdtemp(prefix="compare-quick-")) if args.quick else HERE / "runs")
    ).resolve()
    out_dir = (args.out_dir or (runs_dir if args.quick else HERE)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {algo: [runs_dir / f"{algo}-{seed}" for seed in seeds] for algo in args.algos}

    meta_file = runs_dir / "benchmark.json"  # how the runs were made, for --skip-runs to report
    if not args.skip_runs:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        script = Path(sys.argv[0]).resolve()
        shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        meta = {"command": shlex.join(["python", str(shown), *sys.argv[1:]]), "machine": machine(env)}
        runs_dir.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        print(
            f"{len(args.algos)} scripts x seeds {' '.join(map(str, seeds))}: {total_episodes:,} episodes each, "
            f"eval every {eval_every:,}, one run at a time -> {runs_dir}\n{meta['machine']}"
        )
        # Seed-major order, so that a change in the machine's load over hours hits every algorithm alike.
        for seed in seeds:
            for algo in args.algos:
                print(f"--- {algo} seed {seed}", flush=True)
                began = time.time()
                peak = run(algo, seed, runs_dir / f"{algo}-{seed}", total_episodes, eval_every, env)
                print(
                    f"--- {algo} seed {seed}: {time.time() - began:.0f}s in all, peak RSS {peak:,.0f} MiB", flush=True
                )
    unknown = {"command": "(not recorded)", "machine": "(not recorded)"}
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else unknown

    results = {algo: [load(d) for d in dirs] for algo, dirs in runs.items()}
    plotted = plot(results, out_dir / "curves.png")
    text = report(results, meta, plotted)
    (out_dir / "results.md").write_text(text)
    print(text + f"\nwrote {out_dir / 'results.md'}" + (f" and {out_dir / 'curves.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
