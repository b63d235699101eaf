"""Planted bugs: apply each patch under tests/mutations/ to a temporary copy of the project, run
the tests, and report whether the suite kills it. `make mutations` runs every patch.

A patch file starts with free text before its first `diff --git` line (git apply skips it):

    Bug: what the patch breaks, in one line
    Caught by: tests/<layer>/test_x.py::test_name [more test ids]

The named tests run first (fast); a mutation they miss is run against the whole suite, so the
report says whether *any* test catches it. Usage:

    .venv/bin/python scripts/mutations.py [--named-only] [PATCH ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = ROOT / "tests" / "mutations"
COPIED = ("src", "tests", "pyproject.toml", "README.md")  # README: tests/project/test_readme.py


def header(patch: Path) -> dict[str, str]:
    fields = {}
    for line in patch.read_text().splitlines():
        if line.startswith("diff --git"):
            break
        key, _, value = line.partition(":")
        if value:
            fields[key.strip().lower()] = value.strip()
    return fields


def copy_project(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutations")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def pytest(copy: Path, args: list[str]) -> tuple[bool, str]:
    """Run pytest in the copy with its src first on the path; (passed, first failure)."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *args], cwd=copy, env=env, capture_output=True, text=True)
    failed = [line.split()[1] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return proc.returncode == 0, (failed[0] if failed else proc.stdout.strip()[-200:])


def run_one(patch: Path, named_only: bool) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="retnet-mutant-") as tmp:
        copy = Path(tmp)
        copy_project(copy)
        applied = subprocess.run(["git", "apply", str(patch)], cwd=copy, capture_output=True,
                                 text=True)
        if applied.returncode:
            return "does not apply", applied.stderr.strip().splitlines()[0]
        named = header(patch).get("caught by", "").split()
        if named:
            passed, where = pytest(copy, named)
            if not passed:
                return "killed", where
            if named_only:
                return "survived", "the named tests pass"
        passed, where = pytest(copy, [])
        return ("survived", "the whole suite passes") if passed else ("killed", where)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patches", nargs="*", type=Path)
    parser.add_argument("--named-only", action="store_true",
                        help="run only the tests each patch names (faster, may miss kills)")
    args = parser.parse_args()
    patches = [p.resolve() for p in args.patches] or sorted(MUTATIONS.glob("*.patch"))
    if not patches:
        print(f"no patches under {MUTATIONS}", file=sys.stderr)
        return 2
    survived = 0
    for i, patch in enumerate(patches, 1):
        start = time.perf_counter()
        verdict, where = run_one(patch, args.named_only)
        survived += verdict != "killed"
        bug = header(patch).get("bug", "")
        took = time.perf_counter() - start
        print(f"[{i}/{len(patches)}] {verdict:>13}  {patch.name}  ({took:.0f} s)\n"
              f"      bug: {bug}\n      {'by' if verdict == 'killed' else 'note'}: {where}",
              flush=True)
    print(f"{len(patches) - survived} killed, {survived} not killed, of {len(patches)}")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
