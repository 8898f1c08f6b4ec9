"""A launcher for torchrun that makes one process of a script fail:

    python -m torch.distributed.run --nproc-per-node 2 tests/failing_process.py SCRIPT RANK EXCEPTION [flags]

imports SCRIPT (reinforce, actor_critic, ppo or grpo), makes process RANK raise EXCEPTION (FloatingPointError or
RuntimeError) when it asks for its second batch of training prompts (iteration 1), and runs the script's own
`if __name__ == "__main__":` block with the flags, so what ends the processes is the script's, not a copy."""

import ast
import builtins
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
name, failing_rank, exception = sys.argv[1], int(sys.argv[2]), getattr(builtins, sys.argv[3], None)
assert exception in (FloatingPointError, RuntimeError), sys.argv[3]
sys.argv = [f"{name}.py", *sys.argv[4:]]
module = importlib.import_module(name)
prompts, calls = module.train_prompts, []


def train_prompts(rng, n):
    calls.append(n)
    if len(calls) == 2 and int(os.environ["RANK"]) == failing_rank:
        raise exception(f"planted in process {failing_rank}")
    return prompts(rng, n)


module.train_prompts = train_prompts
source = Path(module.__file__).read_text()
entry = next(node for node in ast.parse(source).body if isinstance(node, ast.If) and "__main__" in ast.unparse(node))
exec(compile(ast.Module(entry.body, type_ignores=[]), module.__file__, "exec"), vars(module))
