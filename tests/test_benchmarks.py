"""benchmarks/compare.py: the table's arithmetic on synthetic metrics, and a --quick run end to end;
benchmarks/critic_ceiling.py on a policy whose true values are known."""

import importlib.util
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import compare as C
from benchmarks import critic_ceiling
from tiny import CHECKPOINT, run_script


def eval_rows(accuracies, every=512, speed=100.0):
    """metrics.jsonl rows of one run: an evaluation every `every` episodes, starting at row 0, with a
    row without an evaluation in between (as a run whose batch is half the interval writes)."""
    rows = []
    for i, acc in enumerate(accuracies):
        if i:
            halfway = every * i - every // 2
            rows.append({"iteration": 2 * i - 1, "episodes": halfway, "seconds": halfway / speed})
        rows.append({"iteration": 2 * i, "episodes": every * i, "seconds": every * i / speed, "eval_accuracy": acc})
    return rows


def run_of(accuracies, peak=500.0, **kw):
    return {"rows": eval_rows(accuracies, **kw), "peak_rss_mib": peak, "args": {}}


def test_first_reach_is_the_first_evaluation_at_or_above_the_threshold():
    rows = eval_rows([0.49, 0.6, 0.55, 0.85])
    assert C.first_reach(rows, 0.5) == (512, 5.12)
    assert C.first_reach(rows, 0.6) == (512, 5.12)  # >=: reaching the threshold exactly counts
    assert C.first_reach(rows, 0.8) == (1536, 15.36)
    assert C.first_reach(rows, 0.4) == (0, 0.0)  # the starting policy is already there
    assert C.first_reach(rows, 0.95) is None


@given(st.lists(st.floats(0, 1), min_size=1, max_size=20), st.floats(0, 1), st.floats(0, 1))
def test_first_reach_finds_the_earliest_evaluation_and_a_higher_threshold_is_never_reached_sooner(accuracies, t1, t2):
    lo, hi = sorted((t1, t2))
    rows = eval_rows(accuracies)
    hit_lo, hit_hi = C.first_reach(rows, lo), C.first_reach(rows, hi)
    if hit_lo is None:
        assert all(a < lo for a in accuracies)
    else:
        i = hit_lo[0] // 512
        assert accuracies[i] >= lo and all(a < lo for a in accuracies[:i])
    if hit_hi is not None:
        assert hit_lo is not None and hit_lo[0] <= hit_hi[0] and hit_lo[1] <= hit_hi[1]


def test_reach_cell_averages_over_the_seeds_that_got_there_and_says_how_many():
    runs = [run_of([0.49, 0.6, 0.85]), run_of([0.49, 0.45, 0.7]), run_of([0.49, 0.82, 0.9], speed=50.0)]
    assert C.reach_cell(runs, 0.5) == "683 ep · 9 s"  # (512 + 1024 + 512) / 3 episodes, (5.12 + 10.24 + 10.24) / 3 s
    assert C.reach_cell(runs, 0.8) == "768 ep · 10 s (2/3 seeds)"  # (1024 + 512) / 2 episodes, (10.24 + 10.24) / 2 s
    assert C.reach_cell(runs, 0.95) == "—"


def test_mean_std_is_the_sample_std_and_only_the_mean_for_one_seed():
    assert C.mean_std([0.9, 0.8, 0.7]) == "0.800 ± 0.100"
    assert C.mean_std([0.5]) == "0.500"


def test_table_has_one_row_per_algorithm_with_final_accuracy_speed_and_peak_memory():
    results = {
        "reinforce": [run_of([0.49, 0.9], peak=600), run_of([0.49, 0.7], peak=650)],
        "ppo": [{**run_of([0.49, 0.8]), "peak_rss_mib": None}],
    }
    lines = C.table(results).splitlines()
    assert len(lines) == 2 + len(results)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert cells["reinforce"] == ["2", "512 ep · 5 s", "512 ep · 5 s (1/2 seeds)", "—", "0.800 ± 0.141", "100", "650"]
    assert cells["ppo"] == ["1", "512 ep · 5 s", "512 ep · 5 s", "—", "0.800", "100", "?"]


@pytest.mark.slow
def test_quick_run_tabulates_and_plots_every_algorithm(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    proc, _ = run_script("benchmarks/compare.py", "--quick", "--runs-dir", str(runs), "--out-dir", str(out))
    text = (out / "results.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| algorithm")
    }
    assert set(rows) == set(C.ALGOS)
    for algo, cells in rows.items():
        metrics = [json.loads(line) for line in (runs / f"{algo}-1" / "metrics.jsonl").read_text().splitlines()]
        final = [r["eval_accuracy"] for r in metrics if "eval_accuracy" in r][-1]
        assert cells[0] == "1" and cells[4] == f"{final:.3f}"
        assert float(cells[5].replace(",", "")) > 0 and float(cells[6].replace(",", "")) > 50  # episodes/s, MiB
    assert "Command: `python benchmarks/compare.py --quick" in text and "Machine: " in text
    if importlib.util.find_spec("matplotlib"):
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "curves.png skipped" in proc.stdout and not (out / "curves.png").exists()

    # --skip-runs re-reads the same runs, so it writes the same report without running anything.
    written = {p: p.stat().st_mtime_ns for p in runs.rglob("*")}
    run_script(
        "benchmarks/compare.py", "--quick", "--skip-runs", "--runs-dir", str(runs), "--out-dir", str(tmp_path / "again")
    )
    assert (tmp_path / "again" / "results.md").read_text() == text
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*")} == written


@pytest.mark.slow
def test_critic_ceiling_is_one_for_a_deterministic_policy():
    """At a temperature near 0 every rollout from a prefix ends as the sampled response did, so the
    true V(s_t) is the return itself and explains all of its variance."""
    tokens, score, ev = critic_ceiling.ceiling(
        str(CHECKPOINT), n_prompts=32, rollouts=2, temperature=1e-4, max_new_tokens=6, seed=0
    )
    assert tokens >= 64 and 0 < score < 1 and ev == 1.0


def qwen2_parameters(c) -> int:
    """Qwen2's parameter count, written out from its config: per layer q, k, v with biases, o without,
    the gated MLP's three matrices and two RMSNorms; the embedding (and an untied LM head); the last norm."""
    h, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * c.intermediate_size + 2 * h
    return c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer + h


@pytest.mark.slow
def test_scale_tiny_reports_every_phase_throughput_and_memory_of_the_model_it_was_asked_for(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    flags = ["--size", "tiny", "--iterations", "2", "--num-prompts", "8", "--max-new-tokens", "8"]
    proc, _ = run_script("benchmarks/scale.py", *flags, "--model-dir", str(tmp_path), "--", "--num-minibatches", "2")
    report = proc.stdout[proc.stdout.index("## benchmarks/scale.py") :]
    rows = [line.split("|")[1:3] for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    ms = {phase.strip(" *"): float(value.strip(" *")) for phase, value in rows[1:]}
    phases = ["generation", "scoring", "forward", "update: forward", "update: backward", "update: Adam", "other"]
    assert set(ms) == {*phases, "total"} and all(ms[p] > 0 for p in phases if p != "other")
    assert abs(sum(ms[p] for p in phases) - ms["total"]) < 0.5  # rounded to 0.1 ms each
    assert float(re.search(r"response tokens per second: ([\d,.]+)", report)[1].replace(",", "")) > 0
    assert float(re.search(r"peak RSS of the process: ([\d,]+) MiB", report)[1].replace(",", "")) > 50
    assert "evaluations and saves skipped" in report and "run to --max-new-tokens" in report

    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen2", 2, 64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    printed = int(re.search(r"([\d,]+) parameters", report)[1].replace(",", ""))
    assert printed == qwen2_parameters(config) == sum(p.numel() for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == config.vocab_size == 64 and tok.decode(tok("12+34=")["input_ids"]) == "12+34="
    stops = GenerationConfig.from_pretrained(tmp_path).eos_token_id
    assert stops == [tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])] == [1, 62, 63]


@pytest.mark.slow
def test_scale_tokenizer_covers_qwens_vocabulary_and_encodes_prompts_as_the_embedded_one(tmp_path):
    """Checked as ppo.py loads it: AutoTokenizer gives any qwen2 folder a Qwen2Tokenizer, whatever class was saved."""
    from transformers import AutoTokenizer

    from benchmarks import scale

    config_class, kwargs = scale.SIZES["vocab"]
    config_class(**kwargs).save_pretrained(tmp_path)
    scale.make_tokenizer(scale.QWEN_VOCAB).save_pretrained(tmp_path)
    tok, embedded = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(CHECKPOINT)
    fillers = tok.convert_ids_to_tokens([14, 151_933, 151_934, 151_935])
    assert len(tok) == 151_936 and fillers == ["<t14>", "<t151933>", "<|im_end|>", "<|endoftext|>"]
    ids = tok("12+34=")["input_ids"]
    assert ids == embedded("12+34=")["input_ids"] and tok.decode(ids) == "12+34="
    assert (tok.pad_token_id, tok.eos_token_id) == (embedded.pad_token_id, embedded.eos_token_id)


def test_profile_per_iteration_figures_leave_out_iteration_0_and_everything_inside_an_evaluation():
    """ppo.py runs iteration 0 (sampling and scoring, no update) and an evaluation before iteration 1, and
    evaluates after the last: the figures are iterations 1..N alone. Here iteration 0 costs 5 s of
    generation and 3 of forward passes, every evaluation 8 s of (nested) generation and 2 of its own,
    the save after iteration 0 0.5 s of setup, and iterations 1 and 2 each 1 s of generation, 1 of
    forward, 2 of update and 0.25 of nothing timed; an evaluation (--eval-every) sits between them."""
    from benchmarks import profile_ppo

    evaluations = [
        ({"wall": 10, "generation": 5, "forward": 3}, {"wall": 20, "generation": 13, "forward": 3, "evaluation": 2}),
        (
            {"wall": 24.75, "generation": 14, "forward": 4, "evaluation": 2, "setup": 0.5, "update: forward": 2},
            {"wall": 34.75, "generation": 22, "forward": 4, "evaluation": 4, "setup": 0.5, "update: forward": 2},
        ),
        ({"wall": 39, "generation": 23, "forward": 5, "evaluation": 4, "setup": 0.5, "update: forward": 4}, {}),
    ]
    per_iteration = profile_ppo.per_iteration(evaluations, iterations=2)
    assert per_iteration == pytest.approx({"generation": 1, "forward": 1, "update: forward": 2, "other": 0.25})


def test_overoptimization_table_reads_the_end_as_the_last_8_iterations_and_names_the_best_evaluation():
    """Ten iterations whose proxy is i, gold i/10 and KL i at iteration i: the end is the mean over
    iterations 2..9 (5.5, 0.55, 5.5 nats, √5.5 = 2.35); evaluations at iterations 0, 5 and 9 scored
    0.3, 0.6 and 0.5, so the best is 0.6, after 500 episodes. (--quick runs too few iterations to tell.)"""
    from benchmarks import overoptimization as O

    rows = [dict(iteration=i, episodes=100 * i, seconds=i, score_mean=i, gold_mean=i / 10, kl=i) for i in range(10)]
    for i, accuracy in ((0, 0.3), (5, 0.6), (9, 0.5)):
        rows[i]["eval_accuracy"] = accuracy
    rm = dict(held_out_accuracy_before=0.5, held_out_accuracy=0.8, eval_pairs=32, train_pairs=64, seconds=3)
    text = O.table({"β = 0": rows}, rm)
    assert "| β = 0 | 0.300 → 0.600 (500) → 0.500 | +5.50 | 0.550 | 5.50 (2.35) | 9 s |" in text.splitlines()


@pytest.mark.slow
def test_overoptimization_quick_tabulates_and_plots_the_three_kl_settings(tmp_path):
    """A reward model, then a PPO run per KL setting against it: one table row each, with the values of
    the run's own metrics.jsonl, and the reward model's held-out accuracy."""
    from benchmarks import overoptimization as O

    proc, _ = run_script("benchmarks/overoptimization.py", "--quick", "--runs-dir", str(tmp_path / "runs"),
                         "--out-dir", str(tmp_path / "out"))  # fmt: skip
    text = (tmp_path / "out" / "overoptimization.md").read_text()
    rows = [
        line for line in text.splitlines() if line.startswith("| ") and "KL setting" not in line and "---" not in line
    ]
    assert [row.split("|")[1].strip() for row in rows] == list(O.SETTINGS)
    for i, row in enumerate(rows):
        metrics = [
            json.loads(line) for line in (tmp_path / "runs" / f"ppo-{i}" / "metrics.jsonl").read_text().splitlines()
        ]
        tail = metrics[-8:]
        assert f"{sum(r['gold_mean'] for r in tail) / len(tail):.3f}" == row.split("|")[4].strip()
        assert f"{[r for r in metrics if 'eval_accuracy' in r][-1]['eval_accuracy']:.3f} |" in row
    assert "Reward model: held-out pairwise accuracy" in text
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "overoptimization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
