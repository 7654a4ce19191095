"""benchmarks/run_gpu.sh: every step it runs by default (and lists in its usage line) has a branch in its dispatch."""

import re
from pathlib import Path

SCRIPT = (Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh").read_text()


def _case_labels() -> set[str]:
    body = SCRIPT[SCRIPT.index("case $s in") : SCRIPT.index("esac")]
    return set(re.findall(r"^\s+([a-z][a-z0-9-]*)\)", body, flags=re.MULTILINE))


def test_default_steps_all_have_a_branch() -> None:
    default = re.search(r"steps=\$\{\*:-([^}]*)\}", SCRIPT).group(1).split()
    assert default and set(default) <= _case_labels(), set(default) - _case_labels()


def test_usage_line_lists_exactly_the_steps() -> None:
    usage = re.search(r"STEP: (.*?)\(default: all\)", SCRIPT, flags=re.DOTALL).group(1)
    listed = set(usage.replace("#", " ").split())
    assert listed == _case_labels()
