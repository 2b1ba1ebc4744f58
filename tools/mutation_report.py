"""Summarize a finished `mutmut run` per module: mutants total / killed / survived / timeout / no tests, and the score.

Usage (from the repository root, after `mutmut run`):  python tools/mutation_report.py [--survivors]

Reads mutmut's own result files (mutants/**/*.py.meta); prints a Markdown table (docs/testing.md records it) and,
with --survivors, one line per surviving mutant: its id and the changed source line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "type check", -11: "segfault",
          -9: "segfault", None: "not checked"}


def load(root: Path = Path("mutants")) -> dict[str, dict[str, str]]:
    """{module: {mutant id: status}}."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        module = ".".join(meta.relative_to(root).with_suffix("").with_suffix("").parts)
        out[module] = {k: STATUS.get(v, "suspicious") for k, v in data["exit_code_by_key"].items()}
    return out


def table(results: dict[str, dict[str, str]]) -> str:
    rows = ["| module | mutants | killed | survived | timeout | no tests | score |", "|---|---:|---:|---:|---:|---:|---:|"]
    total = Counter()
    for module, mutants in results.items():
        c = Counter(mutants.values())
        c["total"] = len(mutants)
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(name, c) -> str:
    killed = c["killed"] + c["timeout"]  # a mutant that hangs the tests is caught by them too
    score = 100 * killed / c["total"] if c["total"] else 100.0
    return (f"| {name} | {c['total']} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} "
            f"| {score:.1f}% |")


def changed_line(mutant: str) -> str:
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], capture_output=True, text=True).stdout
    plus = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(plus) or "(line removed)"


def main(argv) -> int:
    results = load()
    print(table(results))
    if "--survivors" in argv:
        print()
        for module, mutants in results.items():
            for mutant, status in mutants.items():
                if status not in ("killed", "timeout"):
                    print(f"- `{mutant.removeprefix('qwen_image_trt.')}` ({status}): `{changed_line(mutant)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
