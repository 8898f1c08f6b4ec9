"""How ppo.py scales to a real model's shape: memory, time per phase and throughput of its own training loop.

Builds a model of a named size from its config (random weights, nothing downloaded) with a tokenizer
that covers the addition prompts and the model's full vocabulary, saves both, and runs ppo.py's main()
on them through profile_ppo.py's timers. Prints one report: the model, the flags, milliseconds per
phase and per iteration, response tokens per second, peak memory and, on CUDA, the update's MFU.

    python benchmarks/scale.py --size tiny --iterations 2 --num-prompts 8 --max-new-tokens 8   # seconds
    python benchmarks/scale.py --size vocab -- --num-minibatches 1 --ppo-epochs 1  # Qwen2's vocabulary on a CPU
    python benchmarks/scale.py --size 0.5b --device cuda --num-prompts 256 --max-new-tokens 256 --micro-batch-size 16

The weights are random, so a response seldom samples a stop token and most run to --max-new-tokens.
ppo.py's evaluations (500 prompts, greedy and sampled, before and after training) and the saves that
follow them are skipped unless --eval is given: they are not part of an iteration.
"""

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402
from benchmarks import profile_ppo  # noqa: E402

QWEN2 = dict(
    rms_norm_eps=1e-6, max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
)
QWEN_VOCAB = 151_936
SIZES = {  # (config class, its arguments); the Qwen2.5 and Llama-3 shapes are those of the hub's config.json
    "tiny": (Qwen2Config, dict(QWEN2, vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "vocab": (Qwen2Config, dict(QWEN2, vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=256,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True)),
    "0.5b": (Qwen2Config, dict(QWEN2, vocab_size=QWEN_VOCAB, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               tie_word_embeddings=True)),
    "1.5b": (Qwen2Config, dict(QWEN2, vocab_size=QWEN_VOCAB, hidden_size=1536, intermediate_size=8960,
                               num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                               tie_word_embeddings=True)),
    "7b": (Qwen2Config, dict(QWEN2, vocab_size=152_064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             tie_word_embeddings=False)),
    "8b": (LlamaConfig, dict(vocab_size=128_256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                             max_position_embeddings=8192, rope_parameters={"rope_type": "default",
                             "rope_theta": 5e5}, tie_word_embeddings=False)),
}  # fmt: skip
# Dense bf16 tensor-core FLOP/s from NVIDIA's data sheets, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H200": 989e12, "A100": 312e12}  # the first is H100 SXM's name
UPDATE = ("update: forward", "update: backward", "update: Adam")


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The embedded checkpoint's character tokenizer (<pad>, <eos>, 0-9, +, =), its pre-tokenizer and
    decoder, with filler tokens <t14>, <t15>, ... up to vocab_size: the prompts encode as they do for the
    embedded policy, and the sampler can produce every id of the model's vocabulary. The last two ids are
    Qwen's stop tokens <|im_end|> and <|endoftext|>: transformers loads any qwen2 folder with
    Qwen2Tokenizer, which adds <|endoftext|> past the vocabulary unless it is in it already."""
    base = Tokenizer.from_file(str(ppo.HERE / "checkpoints" / "sft-addition" / "tokenizer.json"))
    vocab = base.get_vocab()
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size - 2)})
    vocab.update({"<|im_end|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer, backend.decoder = base.pre_tokenizer, base.decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def build(size: str, path: Path, device: torch.device):
    """Save a randomly initialised model of `size` and its tokenizer at `path`; return the model's config.
    <|im_end|> and <|endoftext|> are stop tokens besides EOS, as in Qwen2.5-Instruct. bf16 as on the hub:
    ppo.py loads the policy in float32 whatever the checkpoint's dtype."""
    config_class, kwargs = SIZES[size]
    tok = make_tokenizer(kwargs["vocab_size"])
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    config = config_class(**kwargs, **ids)
    torch.manual_seed(0)
    with device:  # a GPU initialises an 8B model in seconds, a CPU in minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [tok.eos_token_id, config.vocab_size - 2, config.vocab_size - 1]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)  # what ppo.py will use, which may not be the class saved
    if len(loaded) != config.vocab_size or loaded.decode(loaded("12+34=")["input_ids"]) != "12+34=":
        sys.exit(f"error: {type(loaded).__name__} loaded from {path} does not match the model's vocabulary")
    return config


def matmul_params(model) -> int:
    """Parameters that every token multiplies: all but the embedding table and the LM head (the head only
    runs where a logit predicts a response token; counted apart)."""
    head = model.get_output_embeddings()
    skip = {id(model.get_input_embeddings().weight), id(head.weight) if head is not None else None}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


flops = dict(tokens=0, response_tokens=0, model=0.0, recomputed=0.0)


def count_update_flops(fn, gradient_checkpointing: bool, lora: bool):
    """Wrap ppo.PolicyAndCritic.forward to add up, over the update's passes (those with gradients), the tokens
    through the backbone (the whole [b, P+T] micro-batch, prompt and padding included: the model computes them all)
    and through the LM head (every response position, as ppo.py computes it), and their model FLOPs: 6 per
    parameter and token for forward and backward, 4 with LoRA (a frozen weight gets no gradient of its own;
    the adapters' few FLOPs are not counted). Recomputation is counted apart: the LM head's chunks always run
    their forward again in the backward pass, and with gradient checkpointing every layer does."""
    per_token = 4 if lora else 6

    def wrapper(agent, ids, attn, prompt_width, temperature, entropy=False):
        policy, critic = agent.policy, agent.critic
        if torch.is_grad_enabled():
            backbone = matmul_params(policy) + (matmul_params(critic) if critic is not None else 0)
            head, n_response = policy.get_output_embeddings().weight.numel(), attn[:, prompt_width:].numel()
            flops["tokens"] += ids.numel()
            flops["response_tokens"] += n_response
            flops["model"] += per_token * (backbone * ids.numel() + head * n_response)
            flops["recomputed"] += 2 * (backbone * ids.numel() * gradient_checkpointing + head * n_response)
        return fn(agent, ids, attn, prompt_width, temperature, entropy)

    return wrapper


def synced(fn, before: bool):
    """CUDA runs asynchronously: without a sync, a phase's kernels would be billed to whatever waits for them next."""

    def wrapper(*args, **kwargs):
        if before:
            torch.cuda.synchronize()
        result = fn(*args, **kwargs)
        if not before:
            torch.cuda.synchronize()
        return result

    return wrapper


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    defaults = ppo.Args()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="vocab", help="the model's shape (default: vocab)")
    parser.add_argument("--iterations", type=int, default=1, help="iterations timed, after ppo.py's iteration 0")
    parser.add_argument("--num-prompts", type=int, default=32, help="responses per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response")
    parser.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size)
    parser.add_argument("--inference-batch-size", type=int, default=defaults.inference_batch_size)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=False,
                        help="run ppo.py's evaluations and saves (default: skipped)")  # fmt: skip
    parser.add_argument("--model-dir", help="where to save the model built (default: a temporary folder)")
    parser.add_argument("extra", nargs="*", help="flags passed to ppo.py (after --)")
    args = parser.parse_args()
    command = " ".join(sys.argv[1:])  # before profile() replaces sys.argv with ppo.py's
    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    if args.iterations < 1 or cuda and not torch.cuda.is_available():
        sys.exit(
            "error: --iterations must be >= 1" if args.iterations < 1 else f"error: --device {args.device}: no CUDA"
        )
    device = torch.device("cuda" if cuda else "cpu")  # ppo.py runs on cuda:LOCAL_RANK, whatever index --device names

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / "model")
        started = time.perf_counter()
        config = build(args.size, model_dir, device)
        built = time.perf_counter() - started
        flags = ["--model", str(model_dir), "--num-prompts", str(args.num_prompts)]
        flags += ["--max-new-tokens", str(args.max_new_tokens), "--micro-batch-size", str(args.micro_batch_size)]
        flags += ["--inference-batch-size", str(args.inference_batch_size), "--device", args.device]
        flags += ["--gradient-checkpointing"] * args.gradient_checkpointing + args.extra
        if not args.eval:
            ppo.evaluate = lambda *a, **k: {"eval_accuracy": 0.0, "eval_reward_sampled": 0.0}
            ppo.save = lambda *a, **k: None
        timed = [(ppo, "sample"), (ppo.PolicyAndCritic, "forward"), (ppo, "token_logprobs"), (torch.Tensor, "backward")]
        timed += [(torch.optim.Adam, "step")]
        for owner, name in timed if cuda else []:
            setattr(owner, name, synced(getattr(owner, name), before=False))  # inside the timer
        profile_ppo.instrument()
        for owner, name in timed if cuda else []:
            setattr(owner, name, synced(getattr(owner, name), before=True))  # outside it
        lora = "--lora-rank" in args.extra and int(args.extra[args.extra.index("--lora-rank") + 1]) > 0
        ppo.PolicyAndCritic.forward = count_update_flops(ppo.PolicyAndCritic.forward, args.gradient_checkpointing, lora)
        gc.collect()  # building the model is not part of the run
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        # profile() passes its own --output-dir first; tyro, like argparse, keeps the last one given.
        profile_ppo.profile(args.iterations, [*flags, "--output-dir", str(Path(tmp) / "run")])
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    report(args, command, config, flags, rows, cuda and device, wall, built, rss_before, lora)


def per_iter(key: str, iterations: int) -> float:
    return flops[key] / iterations  # iteration 0 does not update, so every update pass is in iterations 1..N


def report(
    args,
    command: str,
    config,
    flags: list[str],
    rows: list[dict],
    device,
    wall: float,
    built: float,
    rss_before: float,
    lora: bool,
):
    n = args.iterations
    phases = profile_ppo.per_iteration(profile_ppo.evaluations, n)
    seconds = sum(phases.values())
    with torch.device("meta"):  # the shape alone, to count parameters
        model = AutoModelForCausalLM.from_config(config)
    params, backbone = sum(p.numel() for p in model.parameters()), matmul_params(model)
    length = sum(r["response_length"] for r in rows if r["iteration"] > 0) / n  # mean valid tokens per response
    response_tokens = length * args.num_prompts
    print(f"\n## benchmarks/scale.py {command}\n")
    print(
        f"model: --size {args.size}, {type(config).__name__} {config.num_hidden_layers} layers x "
        f"{config.hidden_size}, vocabulary {config.vocab_size:,}: {params:,} parameters ({backbone:,} outside "
        f"the embedding and LM head), random weights, so most responses run to --max-new-tokens"
    )
    name = torch.cuda.get_device_name(device) if device else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"ppo.py {' '.join(flags[2:])}")
    print(
        f"{n} iteration(s) timed after ppo.py's iteration 0 (which samples and scores without updating); "
        + ("evaluations and saves included in the wall time" if args.eval else "evaluations and saves skipped")
    )
    print("\n| phase | ms per iteration | share |\n| --- | --- | --- |")
    for phase, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {s * 1000:.1f} | {100 * s / seconds:.0f}% |")
    print(f"| **total** | **{seconds * 1000:.1f}** | |\n")
    print(f"response tokens per iteration: {response_tokens:,.0f} ({length:.2f} per response x {args.num_prompts})")
    rate = lambda x: f"{x:,.0f}" if x >= 10 else f"{x:.2f}"
    print(
        f"response tokens per second: {rate(response_tokens / seconds)} (whole iteration), "
        f"{rate(response_tokens / phases['generation'])} (sampling alone)"
    )
    print(
        f"tokens trained per iteration: {per_iter('tokens', n):,.0f} through the backbone (every [b, P+T] "
        f"micro-batch of the update, prompt and padding included, all epochs), "
        f"{per_iter('response_tokens', n):,.0f} through the LM head (every response position)"
    )
    print(f"peak RSS of the process: {peak_rss_mib():,.0f} MiB (before ppo.main(), model built: {rss_before:,.0f} MiB)")
    frozen = 2 if device else 4  # bytes per frozen parameter: bf16 on CUDA
    if lora:
        print(
            f"expected for the weights alone: {frozen * params / 2**20:,.0f} MiB (the frozen base, {frozen} bytes per "
            "parameter, which π_ref shares; the adapters and their Adam state are a few MiB), before activations"
        )
    else:
        print(
            f"expected for the weights alone: {(16 + frozen) * params / 2**20:,.0f} MiB (π_θ's float32 weights, "
            f"gradients and Adam's two moments, 16 bytes per parameter, and π_ref's {frozen}), before activations"
        )
    errors = [r["first_minibatch_ratio_error"] for r in rows if "first_minibatch_ratio_error" in r]
    print(f"first-minibatch ratio error max |r_t - 1| before the first step: {max(errors):g} (exactly 0 expected)")
    if device:
        gib = 2**30
        print(
            f"CUDA peak: {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved(device) / gib:.2f} GiB reserved"
        )
        update = sum(phases.get(k, 0.0) for k in UPDATE)
        model_flops, recomputed = per_iter("model", n), per_iter("recomputed", n)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak is None:
            print(f"MFU of the update: unknown GPU ({name}); {model_flops / update / 1e12:.1f} TFLOP/s achieved")
        else:
            print(
                f"MFU of the update: {model_flops / update / peak:.1%} ({model_flops / update / 1e12:.1f} of "
                f"{peak / 1e12:.0f} TFLOP/s: {4 if lora else 6} x the parameters outside the embedding and LM head "
                f"x the tokens through the backbone, + as many x the LM head's x the response positions, over the "
                f"update's forward, "
                f"backward and Adam; attention's own products not counted); counting the recomputed forward passes: "
                f"{(model_flops + recomputed) / update / peak:.1%}"
            )
    if args.eval:
        spent = sum(end["wall"] - start["wall"] for start, end in profile_ppo.evaluations)
        print(
            f"evaluations: {len(profile_ppo.evaluations)}, {spent:.1f} s in all (500 prompts, greedy and sampled, each)"
        )
    print(
        f"wall time of ppo.main(): {wall:.1f} s (loading the models, iterations 0..{n}"
        + (", two evaluations and saves" if args.eval else "")
        + f"); building and saving the model before it: {built:.1f} s"
    )


if __name__ == "__main__":
    main()
