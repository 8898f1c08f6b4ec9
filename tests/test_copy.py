"""Copying a script, the third use of this repository, and a first run. A script copied alone into another folder
(with gae.py, the one module two of them import), its task block replaced by another task, runs end to end: the
block is the whole contract between a task and the rest of the file. A library too old for the file stops it at
start with one line, and --help says what the script is."""

import importlib
import inspect
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from tiny import CHECKPOINT, ROOT, SMALL_RUN, assert_one_error_line_before_any_work, exit_message

SCRIPTS = ["reinforce", "actor_critic", "ppo", "grpo", "reward_model", "sft"]

# Another task, in the characters the embedded policy's tokenizer knows ("0123456789+=", sft.py): write the digits
# of the prompt backwards. Its reward is not 0/1 but the share of the reversed string in place, and it defines the
# three names the README's contract names and nothing else: a name the rest of a script reads from the addition
# task's block (its pairs, its seed) would be missing here.
REVERSE_TASK = '''
# ==== The task: reverse a string of digits. ====
def reward(prompt: str, completion: str, finished: bool) -> float:
    """The share of the reversed digits written in place; 0.0 for a response cut off before a stop token."""
    target = prompt.removesuffix("=")[::-1]
    right = sum(a == b for a, b in zip(completion, target))
    return right / max(len(target), len(completion)) if finished else 0.0


def train_prompts(rng, n: int) -> list[str]:
    return ["".join(rng.choice("0123456789") for _ in range(rng.randint(2, 4))) + "=" for _ in range(n)]


def eval_prompts() -> list[str]:
    return [f"{n}=" for n in range(100, 116)]


'''


def with_task(source: str, task: str) -> str:
    """`source` with its task block (from the task's banner to the next banner) replaced by `task`."""
    lines = source.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("# ==== The task"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ===="))
    return "".join(lines[:start]) + task.lstrip("\n") + "".join(lines[end:])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["reinforce", "actor_critic", "ppo", "grpo"])
def test_a_script_copied_alone_with_another_task_runs_end_to_end(script, tmp_path):
    """The copy imports nothing from this repository but gae.py, reads the task only through reward,
    train_prompts and eval_prompts, and logs finite metrics (an evaluation before the first update and after the
    last) on a reward that is not 0/1."""
    copy = tmp_path / "project"
    copy.mkdir()
    (copy / f"{script}.py").write_text(with_task((ROOT / f"{script}.py").read_text(), REVERSE_TASK))
    if "from gae import" in (ROOT / f"{script}.py").read_text():
        shutil.copy(ROOT / "gae.py", copy / "gae.py")
    out = tmp_path / "run"
    budget = ["--total-episodes", "16", "--eval-every", "16", "--max-new-tokens", "5"]
    cmd = [sys.executable, f"{script}.py", "--model", str(CHECKPOINT), "--output-dir", str(out), *budget]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *SMALL_RUN[script]], capture_output=True, text=True, cwd=copy, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and rows[-1]["episodes"] >= 16
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    evaluated = [row for row in rows if "eval_accuracy" in row]
    assert [rows.index(row) for row in evaluated] == [0, len(rows) - 1]
    assert all(0 <= row[key] <= 1 for row in evaluated for key in ("eval_accuracy", "eval_reward_sampled"))
    shown = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("    '")]
    assert shown[0][0].strip() == "'100='"  # the evaluation's first prompts, shown with their completions and scores
    assert any(0 < float(score) < 1 for *_, score in shown)  # greedy responses, partly right


def run_in_process(name: str, argv: list[str], monkeypatch):
    """What `python {name}.py argv...` passes to sys.exit, run in this process (sft.py parses its command line
    under `if __name__ == "__main__"`)."""
    if name != "sft":
        return exit_message(monkeypatch, importlib.import_module(name).main, [f"{name}.py", *argv])
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "sft.py"), run_name="__main__")
    return exited.value.code


# A budget small enough that a script whose check were missing would end quickly, and the test fail.
TINY = {
    **{name: [*flags, "--total-episodes", "8", "--eval-every", "8"] for name, flags in SMALL_RUN.items()},
    "sft": ["--max-steps", "1"],
    "reward_model": ["--num-pairs", "16", "--eval-pairs", "8", "--epochs", "1", "--calibration-samples", "8"],
}


@pytest.mark.parametrize("library, old", [("transformers", "4.57.1"), ("torch", "2.5.1+cpu"), ("Python", None)])
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_library_too_old_for_the_script_stops_it_with_one_error_line(
    name, library, old, monkeypatch, capsys, tmp_path
):
    """Under transformers 4.x the scripts would fail only once running, on names of transformers 5 (`dtype=`,
    `cache=`): each stops before any work, naming the library, the version it needs and the one it found."""
    module = importlib.import_module(name)
    with monkeypatch.context() as patch:
        if library == "Python":
            patch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
        else:  # the module the script imported, and sys.modules' (another object once transformers re-registers it)
            for imported in {id(m): m for m in (getattr(module, library), sys.modules[library])}.values():
                patch.setattr(imported, "__version__", old)
        message = run_in_process(name, ["--output-dir", str(tmp_path / "run"), *TINY[name]], patch)
    assert_one_error_line_before_any_work(message, f"error: {name}.py needs {library} >= ", capsys, tmp_path / "run")
    assert message.endswith(f"; this is {old or '3.10.14'}"), message


def test_the_version_check_is_the_same_code_in_every_script():
    assert len({inspect.getsource(importlib.import_module(name).check_versions) for name in SCRIPTS}) == 1


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_starts_with_the_scripts_description_and_prints_each_default_once(name, monkeypatch, capsys):
    """After the usage line, the first paragraph of the script's docstring; then each flag with its docstring and
    tyro's one "(default: ...)", never a second default written into the docstring."""
    assert run_in_process(name, ["--help"], monkeypatch) == 0
    usage, rest = capsys.readouterr().out.split("\n\n", 1)
    description = " ".join(importlib.import_module(name).__doc__.split("\n\n")[0].split())
    assert re.match(rf"usage: \S*{name}.py ", usage) and " ".join(rest.split()).startswith(description)
    shown = " ".join(re.sub("[│╭╮╰╯─]", " ", rest).split())  # tyro draws a box and wraps to the terminal
    assert len(re.findall(r"\(default: ", shown)) >= 5
    assert not re.search(r"\(default[^()]*\) \(default", shown), re.search(r"[^()]*\(default[^()]*\) \(default", shown)
