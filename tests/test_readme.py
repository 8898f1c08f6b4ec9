"""The README is a reading guide that points at tests: every test it names exists, in the file it names, and
the tests of its two guided sections ("How to read a script", "Implementation details") run in the fast tier,
`pytest -m "not slow"`, so that a reader who changes a line can run them in about a minute."""

import ast
import re
from pathlib import Path

from tiny import ROOT

NAMED = re.compile(r"`(tests/\w+\.py)::(test_\w+)`")
GUIDED = ("How to read a script", "Implementation details")


def section(text: str, title: str) -> str:
    """The text of the README's `## title` section, up to the next heading of its level."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"the README has no section '## {title}'"
    return match.group(1)


def is_slow(decorator: ast.expr) -> bool:
    """@pytest.mark.slow, called or not."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(node, ast.Attribute) and node.attr == "slow"


def marks_in(path: Path) -> dict[str, bool]:
    """Each test function of a file (by parsing it: nothing is imported or run), and whether it is marked slow,
    by its own decorator or by the module's `pytestmark`."""
    tree = ast.parse(path.read_text())
    module_slow = any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and any(is_slow(m) for m in (node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]))
        for node in tree.body
    )
    return {
        node.name: module_slow or any(map(is_slow, node.decorator_list))
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def missing_and_slow(readme: str) -> tuple[list[str], list[str]]:
    """The README's test references that name no test of their file, and those of the guided sections that are
    marked slow."""
    files: dict[str, dict[str, bool]] = {}

    def lookup(path: str) -> dict[str, bool]:
        if path not in files:
            files[path] = marks_in(ROOT / path) if (ROOT / path).is_file() else {}
        return files[path]

    missing = [f"{p}::{t}" for p, t in NAMED.findall(readme) if t not in lookup(p)]
    guided = "".join(section(readme, title) for title in GUIDED)
    slow = [f"{p}::{t}" for p, t in NAMED.findall(guided) if lookup(p).get(t)]
    return missing, slow


def test_every_test_the_readme_names_exists_in_the_file_it_names():
    """Each `tests/<file>.py::test_<name>` in the README is a test function of that file, and every test name
    in the README comes with its file (a bare `test_...` would leave the reader to search)."""
    readme = (ROOT / "README.md").read_text()
    assert len(NAMED.findall(readme)) >= 30
    assert missing_and_slow(readme)[0] == []
    assert re.findall(r"`(test_\w+)`", readme) == []


def test_the_tests_the_readmes_guided_sections_name_are_in_the_fast_tier():
    """None of the tests named in "How to read a script" and "Implementation details" is marked slow: they
    are the mathematics, and run with `pytest -m "not slow"`."""
    readme = (ROOT / "README.md").read_text()
    assert all(NAMED.search(section(readme, title)) for title in GUIDED)
    assert missing_and_slow(readme)[1] == []


def test_the_checks_see_a_wrong_name_a_wrong_file_a_bare_name_and_a_slow_test(tmp_path):
    """The checks above on a README with planted mistakes: they fail where they should, not vacuously."""
    readme = (ROOT / "README.md").read_text()
    guided = section(readme, "How to read a script")
    bad = readme.replace(guided, guided + "`tests/test_ppo.py::test_no_such_test`\n", 1)
    assert missing_and_slow(bad)[0] == ["tests/test_ppo.py::test_no_such_test"]
    wrong_file = "`tests/test_grpo.py::test_clipped_gradient_is_zero_where_the_clip_binds_and_unclipped_elsewhere`"
    assert missing_and_slow(readme + wrong_file)[0] != []
    slow = "`tests/test_ppo.py::test_default_run_improves_eval_accuracy_on_a_fixed_budget`\n"
    assert missing_and_slow(readme.replace(guided, guided + slow, 1))[1] == [slow.strip()[1:-1]]
    assert missing_and_slow(readme + slow) == ([], [])  # outside the guided sections a slow test may be named
    assert marks_in(ROOT / "tests" / "test_ppo.py")["test_default_run_improves_eval_accuracy_on_a_fixed_budget"]
