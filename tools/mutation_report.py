"""Summarize a finished `mutmut run` per module (docs/testing.md records its output).

Usage, from the repository root after `mutmut run`:

    python tools/mutation_report.py              # the per-module table
    python tools/mutation_report.py --survivors  # and every mutant not killed: its id and the changed line

Reads mutmut's own result files (mutants/**/*.py.meta). The score counts killed and timed-out mutants (a mutant
that hangs the tests is caught by them) over all mutants of the module's functions in scope; NARROWED lists the
functions left out of a module's score and why (they still run, and show as "no tests").
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

# Functions that only drive I/O, left out of their module's score (docs/testing.md says why).
NARROWED = {
    "qwen_image_trt.calibration.capture": {
        "x_calibrate": "drives diffusers' pipeline over the prompts, resumes, writes manifests (tests/test_calibration.py)",
        "x__record_prompt": "runs the pipeline once and writes the shard (tests/test_calibration.py)",
    },
}


def load(root: Path = Path("mutants")) -> dict[str, dict[str, str]]:
    """{module: {mutant id: status}}."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        module = ".".join(meta.relative_to(root).with_suffix("").with_suffix("").parts)
        out[module] = {k: STATUS.get(v, "suspicious") for k, v in data["exit_code_by_key"].items()}
    return out


def function_of(mutant: str) -> str:
    """'pkg.mod.xǁClassǁmethod__mutmut_3' -> 'xǁClassǁmethod'."""
    return mutant.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]


def in_scope(module: str, mutant: str) -> bool:
    return function_of(mutant) not in NARROWED.get(module, {})


def table(results: dict[str, dict[str, str]]) -> str:
    rows = ["| module | mutants | killed | survived | timeout | no tests | score | out of scope |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = Counter()
    for module, mutants in results.items():
        scoped = [s for m, s in mutants.items() if in_scope(module, m)]
        c = Counter(scoped)
        c["total"], c["out"] = len(scoped), len(mutants) - len(scoped)
        total.update(c)
        rows.append(_row(module.removeprefix("qwen_image_trt."), c))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(name, c) -> str:
    caught = c["killed"] + c["timeout"]
    score = 100 * caught / c["total"] if c["total"] else 100.0
    return (f"| {name} | {c['total']} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} "
            f"| {score:.1f}% | {c['out']} |")


def changed_line(mutant: str) -> str:
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], capture_output=True, text=True,
                          check=True).stdout
    plus = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(plus) or "(line removed)"


def main(argv) -> int:
    results = load()
    if not results:
        print("no mutmut results under mutants/: run `mutmut run` first", file=sys.stderr)
        return 1
    print(table(results))
    if "--survivors" in argv:
        print()
        for module, mutants in results.items():
            for mutant, status in mutants.items():
                if status not in ("killed", "timeout") and in_scope(module, mutant):
                    print(f"- `{mutant.removeprefix('qwen_image_trt.')}` ({status}): `{changed_line(mutant)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
