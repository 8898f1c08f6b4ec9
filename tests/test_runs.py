"""What a run does with its folder and its processes: it never replaces a run it was not asked to, it starts
each torchrun process on its own GPU with a timeout long enough for rank 0's saves, it restores a save made on
any device, and its error lines reach stderr whole. The plumbing is the same code in every script."""

import datetime
import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tiny import ROOT, SMALL_RUN, exit_message, run_main

SCRIPTS = ["reinforce", "actor_critic", "ppo", "grpo"]
RM_SMALL = ["--num-pairs", "6", "--eval-pairs", "2", "--epochs", "1", "--calibration-samples", "8"]


def small_run(name: str, out_dir, *flags) -> list[dict]:
    flags = [*SMALL_RUN[name], "--max-new-tokens", "3", "--total-episodes", "8", *flags, "--output-dir", str(out_dir)]
    return run_main(importlib.import_module(name), *flags)


# ---- Nothing a user made is lost ----
@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_run_into_a_folder_that_holds_a_run_stops_before_any_work_and_says_how_to_go_on(name, tmp_path, monkeypatch):
    """A second run into the folder of the first, with another seed, ends in one line that names what is there
    and the three ways on (--resume, another --output-dir, --overwrite), and leaves the first run as it was;
    with --overwrite it replaces it."""
    small_run(name, tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = [f"{name}.py", *SMALL_RUN[name], "--seed", "2", "--output-dir", str(tmp_path)]
    message = exit_message(monkeypatch, importlib.import_module(name).main, argv)
    assert message == (
        f"error: --output-dir {tmp_path} holds a run (metrics.jsonl, model): continue it with --resume {tmp_path}, "
        "write to another --output-dir, or replace it with --overwrite"
    )
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    small_run(name, tmp_path, "--seed", "2", "--overwrite")
    assert json.loads((tmp_path / "args.json").read_text())["seed"] == 2


@pytest.mark.parametrize("name", [*SCRIPTS, "reward_model"])
def test_an_output_dir_that_is_a_file_is_one_error_line(name, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    argv = [f"{name}.py", "--output-dir", str(tmp_path / "notes.txt")]
    message = exit_message(monkeypatch, importlib.import_module(name).main, argv)
    assert message == f"error: --output-dir {tmp_path / 'notes.txt'} is a file, not a folder"
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_folder_a_run_left_before_its_first_row_is_not_a_run(tmp_path):
    """A run stopped before it wrote a row or a save left args.json and an empty metrics.jsonl: nothing to keep,
    so a new run may start there."""
    (tmp_path / "args.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    assert [r["iteration"] for r in small_run("ppo", tmp_path)] == [0, 1]


@pytest.mark.slow
def test_reward_model_py_replaces_a_reward_model_only_with_overwrite(tmp_path, monkeypatch):
    import reward_model as rm

    monkeypatch.setattr(sys, "argv", ["reward_model.py", *RM_SMALL, "--output-dir", str(tmp_path)])
    rm.main()
    before = (tmp_path / "model.safetensors").read_bytes()
    message = exit_message(
        monkeypatch, rm.main, ["reward_model.py", *RM_SMALL, "--seed", "2", "--output-dir", str(tmp_path)]
    )
    assert message == (
        f"error: --output-dir {tmp_path} holds a reward model: write to another --output-dir, or replace it with "
        "--overwrite"
    )
    assert (tmp_path / "model.safetensors").read_bytes() == before
    monkeypatch.setattr(
        sys, "argv", ["reward_model.py", *RM_SMALL, "--seed", "2", "--overwrite", "--output-dir", str(tmp_path)]
    )
    rm.main()
    assert json.loads((tmp_path / "args.json").read_text())["seed"] == 2


# ---- Processes and devices ----
@pytest.mark.parametrize("name", SCRIPTS)
def test_each_torchrun_process_makes_its_own_gpu_current_before_the_process_group_starts(name, monkeypatch):
    """Process 1 of 2 on a CUDA machine: cuda:1 is made the current device (all_gather_object puts its tensors
    on the current device, which NCCL, bound to cuda:LOCAL_RANK, refuses elsewhere; and each process would
    open a context on GPU 0), before NCCL starts bound to it, with a timeout of an hour or more: the others
    wait while rank 0 evaluates and saves."""
    module = importlib.import_module(name)
    calls = []
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(("init_process_group", a, k)))
    device = module.start(module.Args())
    assert device == torch.device("cuda", 1)
    assert [c[0] for c in calls] == ["set_device", "init_process_group"] and calls[0][1] == torch.device("cuda", 1)
    _, args, kwargs = calls[1]
    assert args == ("nccl",) and kwargs["device_id"] == device and kwargs["timeout"] >= datetime.timedelta(hours=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_run_saved_on_a_cpu_resumes_on_a_gpu_without_a_cuda_random_state(name, tmp_path, monkeypatch):
    """A CPU run's save holds no CUDA generator state; resumed where CUDA exists, the CUDA generator is left
    as seeded instead of being set to None."""
    module = importlib.import_module(name)
    small_run(name, tmp_path)
    set_states = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: set_states.append(state))
    args = module.Args(**{**json.loads((tmp_path / "args.json").read_text()), "resume": str(tmp_path)})
    run = module.Run(args, name, torch.device("cuda", 0))
    state = run.restore()
    assert state["rng"][0][2] is None and set_states == [] and run.first_iteration == 2


# ---- Error lines ----
RECORD_STDERR = """
import atexit, os, runpy, sys
writes = []
class Recorder:
    def write(self, text):
        writes.append(text)
        return len(text)
    def flush(self):
        pass
sys.stderr = Recorder()
atexit.register(lambda: os.write(2, repr(writes).encode()))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python script.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# one_line_errors is the same code in every script (test_shared.py checks the copies): one of them and reward_model.py
@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "reward_model"])
def test_an_error_line_reaches_stderr_in_one_write(name, tmp_path):
    """Under torchrun every process writes its error line at once; Python's own handler of sys.exit("...")
    writes the message and its newline apart, so two processes' lines interleave ("...processeserror: ...").
    Each script writes the whole line in one write, and exits 1."""
    script = str(ROOT / f"{name}.py")
    proc = subprocess.run([sys.executable, "-c", RECORD_STDERR, script, "--temperature", "-1"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr == repr(["error: --temperature must be > 0\n"])
