"""torchrun: N processes run the same algorithm as one. The equivalence is checked exactly, in float64,
with 2 CPU processes (gloo) against 1, for PPO's update and its logged statistics and for GRPO's three loss
aggregations, with DistributedDataParallel and with --fsdp's sharding (FSDP2); then every script end to end
under torchrun."""

import copy
import importlib
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_param_group  # to count its all-gathers
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

import grpo
import ppo
from gae import gae
from tiny import ROOT, exit_message, tiny_model

EPOCHS, MINIBATCHES, RESPONSES = 2, 2, 16


def ppo_update(path: str, rank: int, world: int, store: str | None, fsdp: bool = False) -> tuple[torch.Tensor, dict]:
    """Process `rank` of `world` takes its share of 16 fixed responses, builds their rewards (with a KL
    penalty), GAE and whitened advantages, and runs EPOCHS x MINIBATCHES steps of update_minibatch on its
    shares of fixed minibatches, as ppo.main does. Returns the parameters after the update and the row of
    statistics ppo.main would log (batch_stats, update_stats, and the adaptive β it would pass on). The same
    16 responses and the same minibatches (global response indices, shuffled within each process's share)
    whatever `world` is. With `fsdp`, the agent is sharded as --fsdp shards it (ppo.shard) and the log-probs of
    its gathered weights (ppo.gathered) are checked against the whole model's."""
    if store is not None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    policy, tok = ppo.load_policy(path, torch.device("cpu"), torch.float64)
    torch.manual_seed(0)  # the same responses in every process
    prompts = [f"{i}+{7 * i}=" for i in range(RESPONSES)]
    ids, attn, prompt_width, mask, _ = ppo.sample(policy, tok, prompts, 4, 1.0, RESPONSES)
    with torch.no_grad():
        logp_old, entropy = ppo.token_logprobs(policy, ids, attn, prompt_width, 1.0, entropy=True)
    noise = lambda *shape: torch.randn(shape or mask.shape, dtype=torch.float64)
    scores = noise(RESPONSES) + 1  # far from whitened already
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, logp_ref=logp_old + 0.1 * noise(), entropy=entropy,
                 values_old=noise(), scores=scores, gold=(scores > 1).double())  # fmt: skip
    share = slice(rank * RESPONSES // world, (rank + 1) * RESPONSES // world)
    batch = {k: v[share] for k, v in batch.items()}
    kl = ppo.kl_penalty(batch["logp_old"], batch["logp_ref"], "k1")
    rewards = ppo.token_rewards(batch["scores"], batch["mask"], kl, 0.1)
    advantages, returns = gae(rewards, batch["values_old"], batch["mask"], 1.0, 0.95)
    batch.update(advantages=ppo.whiten(advantages, batch["mask"]), returns=returns)

    head = torch.nn.Linear(policy.config.hidden_size, 1).double()
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    agent = ppo.PolicyAndCritic(policy, head).train()
    learner = DistributedDataParallel(agent) if store is not None and not fsdp else agent
    if fsdp:
        ppo.shard(agent, None, torch.device("cpu"))
        with ppo.gathered(agent), torch.no_grad():  # the weights of every process, as sampling sees them
            assert torch.equal(agent(ids[share], attn[share], prompt_width, 1.0)[0], batch["logp_old"])
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, fused=True)
    args = ppo.Args(temperature=1.0, micro_batch_size=3)  # 4 responses of a process's share: 3 + 1
    local, steps = RESPONSES // world, []
    for epoch in range(EPOCHS):
        # Minibatch j is the j-th quarter of every process's own shuffled share of the batch.
        shares = [torch.randperm(RESPONSES // 2, generator=torch.Generator().manual_seed(10 * epoch + r))
                  for r in range(2)]  # fmt: skip
        order = torch.cat(
            [torch.stack(p.split(RESPONSES // 2 // MINIBATCHES)) + RESPONSES // 2 * r for r, p in enumerate(shares)], 1
        )  # fmt: skip  [minibatch, global index]
        for minibatch in order:
            idx = minibatch[(minibatch >= rank * local) & (minibatch < (rank + 1) * local)] - rank * local
            steps.append(
                ppo.update_minibatch(learner, optimizer, {k: v[idx] for k, v in batch.items()}, prompt_width, args)
            )
    row = ppo.batch_stats(batch, rewards, returns) | ppo.update_stats(steps)
    row["beta"] = ppo.adaptive_kl_coef(0.1, row["kl"], 0.01, RESPONSES, 100)
    return torch.cat([whole(p).detach().flatten() for p in agent.parameters()]), row


def whole(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter sharded by FSDP (a DTensor), gathered; any other as it is."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter


def ppo_update_in_process(rank: int, world: int, path: str, store: str, out: str, fsdp: bool) -> None:
    # As the scripts end: the group is destroyed once ppo_update has returned and its DistributedDataParallel
    # module is gone (destroyed while the module lived, it hung here once: pytorch/pytorch#56297).
    with ppo.process_group():
        parameters, row = ppo_update(path, rank, world, store, fsdp)
    if rank == 0:
        torch.save((parameters, row), out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_leave_the_parameters_and_log_the_statistics_one_process_does(parallel, tmp_path):
    """PPO's update (whitening, 2 epochs x 2 minibatches, micro-batches of 3) by 2 gloo processes on 8
    responses each leaves the parameters 1 process leaves on the 16, to 1e-10 in float64: the advantages
    are whitened with the global mean and variance, each step's loss is divided by the minibatch's
    token count over both processes, and the average over processes (DistributedDataParallel's all-reduce, or
    FSDP's reduce-scatter with --fsdp) is undone into a sum. Every logged statistic of the batch and of the
    update, the gradient's norm (over both processes' shards with --fsdp), and the adaptive β it drives, is the
    whole batch's too."""
    path = str(tiny_model(tmp_path / "model", "gpt2"))
    one, one_row = ppo_update(path, 0, 1, None)
    store, out = str(tmp_path / "store"), str(tmp_path / "two.pt")
    mp.spawn(ppo_update_in_process, args=(2, path, store, out, parallel == "fsdp"), nprocs=2)
    two, two_row = torch.load(tmp_path / "two.pt")
    start = torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(path).double().parameters()])
    assert (one[: len(start)] - start).abs().max() > 1e-4  # the update moved the parameters
    torch.testing.assert_close(two, one, rtol=0, atol=1e-10)
    assert two_row.keys() == one_row.keys() and len(one_row) == 17 and one_row["beta"] != 0.1
    for key, value in one_row.items():
        assert two_row[key] == pytest.approx(value, rel=1e-9, abs=1e-10), key


def grpo_updates(path: str, rank: int, world: int, store: str | None, fsdp: bool = False) -> dict:
    """For each loss aggregation, the parameters after 2 steps of grpo.update_minibatch by process `rank` of
    `world` on its share of 2 fixed minibatches of 8 responses of different lengths (micro-batches of 3); with
    `fsdp`, the agent sharded as --fsdp shards it (grpo.shard)."""
    if store is not None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    policy, tok = grpo.load_policy(path, torch.device("cpu"), torch.float64)
    torch.manual_seed(0)  # the same responses in every process
    ids, attn, prompt_width, mask, _ = grpo.sample(policy, tok, [f"{i}+{3 * i}=" for i in range(RESPONSES)], 4, 1.0, 16)
    with torch.no_grad():
        logp_old = grpo.token_logprobs(policy, ids, attn, prompt_width, 1.0)[0]
    batch = dict(ids=ids, attn=attn, mask=mask, logp_old=logp_old, logp_ref=logp_old + 0.1 * torch.randn(mask.shape),
                 advantages=torch.randn(RESPONSES, dtype=torch.float64))  # fmt: skip
    assert len(set(mask.sum(1).tolist())) > 1  # responses of several lengths: the aggregations differ
    parameters = {}
    for mode in ("token", "sequence", "constant"):
        agent = grpo.PolicyLogProbs(copy.deepcopy(policy))
        learner = DistributedDataParallel(agent) if store is not None and not fsdp else agent
        if fsdp:
            grpo.shard(agent, None, torch.device("cpu"))
        optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, fused=True)
        args = grpo.Args(temperature=1.0, micro_batch_size=3, loss_aggregation=mode, kl_penalty="k3-loss")
        for half in (slice(0, 8), slice(8, 16)):  # a minibatch: 4 responses in each of 2 processes
            share = slice(half.start + rank * 8 // world, half.start + (rank + 1) * 8 // world)
            grpo.update_minibatch(learner, optimizer, {k: v[share] for k, v in batch.items()}, prompt_width, args, 0.1)
        parameters[mode] = torch.cat([whole(p).detach().flatten() for p in agent.parameters()])
    return parameters


def grpo_updates_in_process(rank: int, world: int, path: str, store: str, out: str, fsdp: bool) -> None:
    with grpo.process_group():  # as ppo_update_in_process
        parameters = grpo_updates(path, rank, world, store, fsdp)
    if rank == 0:
        torch.save(parameters, out)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_grpos_loss_aggregations_do_not_change_with_the_number_of_processes(parallel, tmp_path):
    """Each of the three loss aggregations of grpo.py (over the minibatch's tokens, per response then over
    responses, by a constant) leaves the same parameters, to 1e-10 in float64, whether 1 process or 2 gloo
    processes take the steps (with DistributedDataParallel, or sharded as --fsdp shards them): each token's weight
    comes from the minibatch's counts over every process (the normalisation per process or per micro-batch that
    veRL fixed twice would not). The three do differ."""
    path = str(tiny_model(tmp_path / "model", "gpt2"))
    one = grpo_updates(path, 0, 1, None)
    store, out = str(tmp_path / "store"), str(tmp_path / "two.pt")
    mp.spawn(grpo_updates_in_process, args=(2, path, store, out, parallel == "fsdp"), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    for mode, parameters in one.items():
        torch.testing.assert_close(two[mode], parameters, rtol=0, atol=1e-10, msg=mode)
    assert (one["token"] - one["sequence"]).abs().max() > 1e-6 and (one["token"] - one["constant"]).abs().max() > 1e-6


def fsdp_rollout_and_step(rank: int, world: int, path: str, store: str, out: str) -> None:
    """Process `rank` of 2 shards π_θ with a value head, and π_ref, as ppo.main does with --fsdp, runs a rollout of
    8 responses of at most 8 tokens in its gathered weights and takes one step on them. Process 1's model stops at
    any token, so its responses all end at their first. Rank 0 saves each process's response width and lengths,
    and how many all-gathers FSDP ran in the rollout against how many units (layers, value head, roots) it has."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    (policy, tok), ref_policy = ppo.load_policy(path, cpu), ppo.load_policy(path, cpu)[0].requires_grad_(False)
    if rank == 1:
        policy.generation_config.eos_token_id = list(range(policy.token_id_limit))
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    agent = ppo.PolicyAndCritic(policy, head).train()
    ppo.shard(agent, ref_policy, cpu)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    args = ppo.Args(max_new_tokens=8, num_minibatches=1, micro_batch_size=4, inference_batch_size=4)
    torch.manual_seed(rank)
    all_gather, gathers = fsdp_param_group.foreach_all_gather, []
    fsdp_param_group.foreach_all_gather = lambda *a, **k: gathers.append(1) or all_gather(*a, **k)
    with ppo.gathered(agent, ref_policy):
        batch, prompt_width = ppo.rollout(agent, tok, [f"{i}+{i}=" for i in range(8)], args, ref_policy)
    fsdp_param_group.foreach_all_gather = all_gather
    units = sum(isinstance(m, FSDPModule) for m in [*agent.modules(), *ref_policy.modules()])
    mask = batch["mask"]
    rewards = ppo.token_rewards(batch["scores"], mask, ppo.kl_penalty(batch["logp_old"], batch["logp_ref"], "k1"), 0.1)
    advantages, returns = gae(rewards, batch["values_old"], mask, 1.0, 0.95)
    batch.update(advantages=ppo.whiten(advantages, mask), returns=returns)
    ppo.update_minibatch(agent, optimizer, batch, prompt_width, args)
    widths = [None] * world
    dist.all_gather_object(widths, (mask.shape[1], mask.sum(1).tolist(), len(gathers), units))
    if rank == 0:
        torch.save(widths, out)
    dist.barrier()  # no DistributedDataParallel module here to release first (see ppo.process_group)
    dist.destroy_process_group()


def test_with_fsdp_a_process_whose_responses_all_stop_at_once_does_not_hang_the_other(tmp_path):
    """Under --fsdp, process 1's responses all stop at their first token while process 0's run to the 8th: the
    rollout (sampling, π_old, V_old and π_ref) in weights gathered once (ppo.gathered) runs no collective, so
    each process decodes its own number of steps, and both reach the update's step, within 2 minutes (a run of
    a few seconds). The weights are all-gathered once per FSDP unit for the whole rollout, not at every token: a
    step that gathered a layer's weights per token would leave process 0 waiting for process 1 at its second."""
    path, out = str(tiny_model(tmp_path / "model", "gpt2")), tmp_path / "widths.pt"
    context = mp.start_processes(fsdp_rollout_and_step, args=(2, path, str(tmp_path / "store"), str(out)), nprocs=2,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.time() + 120
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the processes hung")
    (width0, lengths0, gathers0, units0), (width1, lengths1, gathers1, units1) = torch.load(out)
    assert width0 == 8 and max(lengths0) == 8 and width1 == 1 and lengths1 == [1] * 8
    assert gathers0 == units0 == gathers1 == units1 == 7  # π_θ: 2 layers, the value head, the root; π_ref: 2, the root


def torchrun(script: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


SMALL = {
    "reinforce": ["--num-prompts", "8", "--samples-per-prompt", "2"],
    "actor_critic": ["--num-prompts", "16"],
    "grpo": ["--num-prompts", "8", "--group-size", "2", "--num-minibatches", "2", "--kl-coef", "0.1"],
    "ppo --critic separate --gradient-checkpointing": [
        "--num-prompts",
        "16",
        "--num-minibatches",
        "2",
        "--critic",
        "separate",
        "--gradient-checkpointing",
    ],  # fmt: skip
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", SMALL)
def test_torchrun_with_two_processes_writes_one_run(variant, tmp_path):
    """Exit 0; rank 0 alone writes one metrics.jsonl with one row per iteration (the global batch of 16
    episodes per iteration) and evaluations where they are due; the saved model loads with from_pretrained.
    ppo.py runs with a separate critic (its own backbone in the DistributedDataParallel module) and gradient
    checkpointing (recomputed layers inside DDP's backward)."""
    import json

    name = variant.split()[0]
    flags = [*SMALL[variant], "--max-new-tokens", "4", "--total-episodes", "48", "--eval-every", "32"]
    proc = torchrun(f"{name}.py", *flags, "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in rows] == [0, 16, 32, 48]
    assert ["eval_accuracy" in r for r in rows] == [True, False, True, True]
    assert proc.stdout.count(f"{name}: eval_accuracy") == 1  # one process prints
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_processes_is_one_error_line_from_each(tmp_path):
    """Each process checks its arguments before any work and exits with the same one line, whole whatever
    order the two finish in (each writes it at once: test_runs.py); no traceback of the script's own
    (torchrun then reports the failed processes in its own words)."""
    proc = torchrun("ppo.py", "--num-prompts", "12", "--num-minibatches", "4", "--output-dir", str(tmp_path / "run"))
    message = "error: --num-prompts 12 must split into --num-minibatches 4 over 2 processes"
    assert proc.returncode != 0 and [line for line in proc.stderr.splitlines() if "error:" in line] == [message] * 2
    assert 'ppo.py", line' not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("exception", ["FloatingPointError", "RuntimeError"])
def test_a_process_that_fails_ends_the_run_within_seconds_with_one_error(exception, tmp_path):
    """Process 1 raises as iteration 1 begins, while process 0 goes on to its next collective. Process 1 writes
    its error (one line for a non-finite number, a traceback for anything else) and exits at once; process 0's
    collective fails on the closed connection and it exits without a word of its own: the run ends, non-zero,
    in the seconds it takes to start, not at the process group's 2-hour timeout."""
    import time

    flags = [*SMALL["reinforce"], "--max-new-tokens", "4", "--total-episodes", "48", "--output-dir", str(tmp_path)]
    began = time.monotonic()
    proc = torchrun("tests/failing_process.py", "reinforce", "1", exception, *flags)
    assert proc.returncode != 0 and time.monotonic() - began < 60
    assert "[rank0]" not in proc.stderr and "Connection closed" not in proc.stderr  # process 0 says nothing
    errors = [line for line in proc.stderr.splitlines() if "rror: planted" in line]  # error: or RuntimeError:
    if exception == "FloatingPointError":  # the loop's own line, naming the iteration
        assert errors == [f"error: planted in process 1 at iteration 1; the last save is in {tmp_path}"]
    else:  # a bug: its traceback, once
        assert (
            errors == ["[rank1]: RuntimeError: planted in process 1"] and proc.stderr.count("[rank1]: Traceback") == 1
        )


@pytest.mark.parametrize("world, flags, message", [
    ("1", ["--fsdp"], "--fsdp shards over processes: run it under torchrun --nproc-per-node N (N >= 2)"),
    ("2", ["--fsdp", "--lora-rank", "1"], "--fsdp does not combine with --lora-rank (LoRA fits 8B on one GPU)"),
])  # fmt: skip
@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_fsdp_without_torchrun_or_with_lora_is_one_error_line(name, world, flags, message, monkeypatch, tmp_path):
    """--fsdp shards over torchrun's processes: one process alone is refused, and so is LoRA with it (not built:
    LoRA fits an 8B model on one GPU already)."""
    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun sets it; the arguments are checked before any group starts
    text = exit_message(monkeypatch, importlib.import_module(name).main, [f"{name}.py", *flags,
                                                                          "--output-dir", str(tmp_path)])  # fmt: skip
    assert text == "error: " + message and not (tmp_path / "args.json").exists()


# A script run whose processes all end right after the save at iteration 2, as an interrupted run would.
STOPPED_AFTER_A_SAVE = """
import os, sys
sys.path.insert(0, os.getcwd())
module = __import__(sys.argv.pop(1))
save = module.Run.save
def save_then_stop(self, row, *args, **kwargs):
    save(self, row, *args, **kwargs)
    if row["iteration"] == 2:
        os._exit(0)
module.Run.save = save_then_stop
with module.one_line_errors():
    module.main()
"""

FSDP_RUNS = {  # ppo: the separate critic's own sharded body, recomputed layers, β moving; grpo: π_ref in the loss
    "ppo": ["--num-prompts", "16", "--num-minibatches", "2", "--critic", "separate", "--gradient-checkpointing",
            "--kl-coef", "0.1", "--kl-target", "0.01", "--kl-horizon", "100"],
    "grpo": ["--num-prompts", "8", "--group-size", "2", "--num-minibatches", "2", "--kl-coef", "0.1",
             "--kl-penalty", "k3-loss"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP_RUNS)
def test_an_fsdp_run_trains_as_ddp_does_and_resumes_as_if_never_stopped(name, tmp_path):
    """torchrun with 2 processes, 4 iterations of 16 episodes, a save after each. With --fsdp the run logs the rows
    DistributedDataParallel's run logs, to 1e-3 relative (float32 sums in another order), and saves a model that
    from_pretrained loads, the same to 5e-5 (a tenth of how far training moved it). Stopped after its save at
    iteration 2 and continued with --resume, the --fsdp run writes the same rows as when run straight (apart from
    `seconds`) and the same model, bit for bit: the optimizer's moments and the critic, saved whole by rank 0 and
    sharded again, carry over."""
    import json

    flags = [*FSDP_RUNS[name], "--max-new-tokens", "4", "--total-episodes", "64", "--eval-every", "16"]
    runs = {}
    for run, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        proc = torchrun(f"{name}.py", *flags, *extra, "--output-dir", str(tmp_path / run))
        assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "stop.py").write_text(STOPPED_AFTER_A_SAVE)
    proc = torchrun(str(tmp_path / "stop.py"), name, *flags, "--fsdp", "--output-dir", str(tmp_path / "resumed"))
    assert proc.returncode == 0 and not (tmp_path / "resumed" / "model.tmp").exists(), proc.stderr[-3000:]
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 3
    proc = torchrun(f"{name}.py", "--resume", str(tmp_path / "resumed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = lambda path: AutoModelForCausalLM.from_pretrained(path).state_dict()
    for run in ("ddp", "fsdp", "resumed"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        runs[run] = (
            [{k: v for k, v in row.items() if k != "seconds"} for row in rows],
            weights(tmp_path / run / "model"),
        )
    (ddp_rows, ddp_model), (fsdp_rows, fsdp_model), (resumed_rows, resumed_model) = runs.values()
    assert len(fsdp_rows) == 5 and resumed_rows == fsdp_rows
    assert all(torch.equal(resumed_model[k], fsdp_model[k]) for k in fsdp_model)
    for ddp_row, fsdp_row in zip(ddp_rows, fsdp_rows, strict=True):
        assert fsdp_row == pytest.approx(ddp_row, rel=1e-3, abs=1e-6), ddp_row["iteration"]
    start = weights(ROOT / "checkpoints" / "sft-addition")
    assert fsdp_model.keys() == ddp_model.keys() and max((ddp_model[k] - start[k]).abs().max() for k in start) > 2e-4
    for key, value in ddp_model.items():
        torch.testing.assert_close(fsdp_model[key], value, rtol=0, atol=5e-5, msg=key)
