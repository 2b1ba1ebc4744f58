"""Run diffusers' own tests/pipelines/qwenimage/ against engine-backed pipelines (docs/diffusers-tests.md).

    python tools/diffusers_suite/run.py --repo /path/to/diffusers            # a checkout, or a (bare) git dir
    QITRT_DIFFUSERS_REPO=/path python tools/diffusers_suite/run.py --mode stock   # the eager baseline

diffusers' tests are not copied into this repository (nor shipped in its PyPI sdist): they are read from the
diffusers repository given, at --commit (default: its HEAD), into a temporary folder. Only `tests/` is taken, never
`src/`: diffusers' tests/conftest.py puts <checkout>/src first on sys.path, and the gate is the *installed*
diffusers. pytest then runs there in a subprocess with engine_plugin (this folder) loaded; its own conftest.py,
rootdir and `tests` package never meet this repository's.

Exit status: pytest's (0 = everything passed or is an expected, listed outcome). A summary with the counts and
every non-passing test with its reason is printed and, with --summary, written as Markdown.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = "tests/pipelines/qwenimage"


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _git_dir(repo: Path) -> Path | None:
    if (repo / ".git").exists():
        return repo / ".git"
    if (repo / "HEAD").is_file() and (repo / "objects").is_dir():  # a bare or mirror git dir, no work tree
        return repo
    return None


def extract_tests(repo: Path, commit: str | None, dest: Path) -> dict:
    """diffusers' tests/ into `dest`; returns what was used (commit, its setup.py version, how)."""
    git_dir = _git_dir(repo)
    info = {"repo": str(repo)}
    if commit is None and (repo / SUITE).is_dir():  # a work tree: its tests as they are on disk
        shutil.copytree(repo / "tests", dest / "tests")
        info["source"] = "work tree"
        if git_dir:
            info["commit"] = _git(git_dir, "rev-parse", "HEAD")
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "tests"],
                                   capture_output=True, text=True, check=False).stdout.strip()
            info["source"] += " (tests/ modified)" if dirty else ""
    elif git_dir:
        rev = commit or "HEAD"
        info["commit"] = _git(git_dir, "rev-parse", f"{rev}^{{commit}}")
        info["source"] = f"git archive {rev}"
        archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", info["commit"], "tests"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "x", "-C", str(dest)], input=archive, check=True)
    else:
        raise SystemExit(f"{repo}: neither a diffusers checkout (with {SUITE}) nor a git dir")
    if git_dir and info.get("commit"):
        info["date"] = _git(git_dir, "show", "-s", "--format=%cI", info["commit"])
        setup = _git(git_dir, "show", f"{info['commit']}:setup.py")
        info["version"] = next((line.split('"')[1] for line in setup.splitlines()
                                if line.strip().startswith("version=")), "?")
    if not (dest / SUITE).is_dir():
        raise SystemExit(f"{repo} at {commit or 'HEAD'} has no {SUITE}")
    # Anchor pytest's rootdir here: no ini file of any parent folder applies.
    (dest / "pytest.ini").write_text("[pytest]\n")
    return info


def summarize(junit: Path) -> tuple[dict, list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(counts, [(test, outcome, reason)] for every test that did not plainly pass, [(test, max_abs_diff)])."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    rows, parity = [], []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("classname"):  # an interrupted run's last entry
            continue
        *_, module, cls = case.get("classname").split(".")  # tests.pipelines.qwenimage.<module>.<Class>
        name = f"{module}.py::{cls}::{case.get('name')}"
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, reason = ("failed" if child.tag == "failure" else "error"), child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, reason = ("xfailed" if xfail else "skipped"), child.get("message", "")
            elif child.tag == "properties":
                parity += [(name, p.get("value")) for p in child if p.get("name") == "max_abs_diff"]
        counts[outcome] += 1
        if outcome != "passed":
            rows.append((name, outcome, " ".join(reason.split())))
    return counts, rows, parity


def markdown(info: dict, mode: str, counts: dict, rows, parity, seconds: float) -> str:
    head = (f"diffusers {info.get('commit', '?')} ({info.get('version', '?')}, {info.get('date', '?')}; "
            f"{info['source']}), mode {mode}, {seconds / 60:.1f} min")
    lines = [head, "",
             ", ".join(f"{v} {k}" for k, v in counts.items()), "", "| test | outcome | reason |", "|---|---|---|"]
    lines += [f"| `{t}` | {o} | {r.replace('|', '/')} |" for t, o, r in rows]
    if parity:
        lines += ["", "| engine vs eager (added test) | max abs diff |", "|---|---|"]
        lines += [f"| `{t}` | {float(d):.2e} |" for t, d in parity]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.environ.get("QITRT_DIFFUSERS_REPO"),
                   help="diffusers checkout or git dir (default: $QITRT_DIFFUSERS_REPO)")
    p.add_argument("--commit", help="revision to take tests/ from (default: HEAD; a work tree: as on disk)")
    p.add_argument("--mode", choices=("engine", "stock"), default="engine",
                   help="engine: transformer and VAE on ONNX Runtime drop-ins; stock: the eager baseline")
    p.add_argument("--cache", help="exported engines and the hub stand-in (default: ~/.cache/qitrt/diffusers-suite)")
    p.add_argument("--junit", help="keep pytest's junit XML here")
    p.add_argument("--summary", help="write the Markdown summary here")
    p.add_argument("pytest_args", nargs="*", help="after --: test paths under tests/pipelines/qwenimage/ (default: "
                   "all of it) and pytest options, e.g. -- tests/pipelines/qwenimage/test_qwenimage.py -k cfg")
    args = p.parse_args(argv)
    if not args.repo:
        p.error("--repo or QITRT_DIFFUSERS_REPO: a diffusers checkout or git dir")
    extra = list(args.pytest_args) + shlex.split(os.environ.get("QITRT_DIFFUSERS_PYTEST_ARGS", ""))
    targets = [a for a in extra if a.startswith("tests/")] or [SUITE]
    options = [a for a in extra if not a.startswith("tests/")]
    with tempfile.TemporaryDirectory(prefix="qitrt-diffusers-") as tmp:
        root = Path(tmp)
        info = extract_tests(Path(args.repo).resolve(), args.commit, root)
        junit = Path(args.junit).resolve() if args.junit else root / "junit.xml"
        env = dict(os.environ, QITRT_SUITE_MODE=args.mode, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if args.cache:
            env["QITRT_SUITE_CACHE"] = str(Path(args.cache).resolve())
        cmd = [sys.executable, "-m", "pytest", *targets, "-p", "engine_plugin", "-p", "no:cacheprovider",
               "-q", "-rfEsxX", "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning",
               f"--junitxml={junit}", *options]
        print(f"diffusers tests from {info}\n$ {shlex.join(cmd)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=root, env=env, check=False).returncode
        seconds = time.monotonic() - t0
        if not junit.is_file():
            return rc or 1
        counts, rows, parity = summarize(junit)
    text = markdown(info, args.mode, counts, rows, parity, seconds)
    print(text)
    if args.summary:
        Path(args.summary).write_text(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
