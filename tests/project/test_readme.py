"""Every code block of README.md runs as written, in a temporary folder holding what the
snippets name: runs/demo (a tiny random model), hf/demo (its transformers export) and doc.txt.

- A ```python block runs in a fresh interpreter, or, when its first line is exactly
  `# continues the block above`, after the python block before it (and that block's chain) in
  the same interpreter and namespace.
- A ```sh / ```bash / ```console block runs when each of its commands is `retnet` (or
  `.venv/bin/retnet`) with a subcommand in `CHEAP_SUBCOMMANDS` (fast and offline on a tiny
  model): bash runs the block as written with `retnet` a recorder of its arguments, then each
  recorded command line goes, in order, to `retnet.cli.main` (the console script's function)
  in this process, which saves an interpreter start per command.
- Everything else is listed as not run (skipped), with the reason `not_run` gives: training,
  benchmarks, installs, servers, other languages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from servers import make_run

README = Path(__file__).resolve().parents[2] / "README.md"
CONTINUES = "# continues the block above"
SHELLS = ("sh", "bash", "console")
CHEAP_SUBCOMMANDS = ("--help", "info", "generate", "export")
# python blocks that need what a test cannot give as written: (text in the block, why)
PYTHON_NOT_RUN = [("127.0.0.1:8000", "talks to a `retnet serve` listening on port 8000")]
TIMEOUT_S = 120
# The `retnet` that shell blocks run: it writes its arguments, one JSON line per command.
RECORDER = """import json, os, sys
with open(os.environ["README_ARGV"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
# exec: each block is compiled under its README line, so a failure points at the snippet
DRIVER = """import json, sys
namespace = {"__name__": "__main__"}
for name, line, text in json.loads(sys.argv[1]):
    exec(compile("\\n" * line + text, name, "exec"), namespace)
"""


@dataclass
class Block:
    lang: str
    line: int  # of the opening fence
    section: str  # the heading above it, as words joined by "-"
    text: str

    @property
    def key(self) -> str:
        """Its section's first three words and its language, for test ids."""
        return "-".join(self.section.split("-")[:3] + [self.lang])


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, in order."""
    found, section, lang, start, body = [], "top", None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if lang is None and line.startswith("#"):
            section = re.sub(r"\W+", "-", line.lstrip("#").strip()).strip("-").lower()
        elif line.startswith("```") and lang is None:
            lang, start, body = line[3:].strip() or "text", number, []
        elif line.startswith("```"):
            found.append(Block(lang, start, section, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    return found


def chains(found: list[Block]) -> list[list[Block]]:
    """The python blocks grouped into the runs of one interpreter: a block that starts with
    CONTINUES joins the chain of the python block before it."""
    out: list[list[Block]] = []
    for block in (b for b in found if b.lang == "python"):
        if block.text.startswith(CONTINUES + "\n"):
            assert out, f"README.md line {block.line} continues no python block"
            out[-1].append(block)
        else:
            out.append([block])
    return out


def commands(script: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines left
    out."""
    joined = re.sub(r"\\\n", " ", script)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def not_run(block: Block) -> str | None:
    """Why a block is not run, or None when it runs."""
    if block.lang == "python":
        return next((why for text, why in PYTHON_NOT_RUN if text in block.text), None)
    if block.lang not in SHELLS:
        return f"a {block.lang} block, not a program"
    for command in commands(block.text):
        words = command.split()
        retnet = words[0] in ("retnet", ".venv/bin/retnet")
        if not retnet or len(words) < 2 or words[1] not in CHEAP_SUBCOMMANDS:
            return f"runs `{' '.join(words[:2])}`: not a cheap offline retnet command"
    return None


def cases() -> list:
    """One case per python chain and per other block that the rules run (`not_run` says why
    the others are not: no skipped cases), named by section, language and ordinal (README line
    numbers move with every edit above)."""
    found = blocks(README.read_text(encoding="utf-8"))
    units = chains(found) + [[b] for b in found if b.lang != "python"]
    params, seen = [], {}
    for unit in units:
        seen[unit[0].key] = seen.get(unit[0].key, 0) + 1
        if not any(map(not_run, unit)):
            params.append(pytest.param(unit, id=f"{unit[0].key}-{seen[unit[0].key]}"))
    return params


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The folder the snippets run in, with the files they name."""
    from retnet.cli import main

    root = tmp_path_factory.mktemp("readme")
    make_run(root / "runs" / "demo")
    (root / "doc.txt").write_text("def parse(text):\n    return text.split()\n")
    recorder = root / ".venv" / "bin" / "retnet"
    recorder.parent.mkdir(parents=True)
    recorder.write_text(f"#!{sys.executable}\n{RECORDER}")
    recorder.chmod(0o755)
    assert main(["export", "--hf", str(root / "runs" / "demo"), str(root / "hf" / "demo")]) == 0
    return root


def run(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{folder / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "HF_HOME": str(folder / "hf-home"), "HF_HUB_OFFLINE": "1",
           "README_ARGV": str(folder / "argv.jsonl")}
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def run_shell(folder: Path, script: str, monkeypatch, capsys) -> None:
    """The block through bash (quoting, continuations, $'...'), then each command line it
    gave `retnet` through `retnet.cli.main`, in the folder."""
    from retnet.cli import main

    (folder / "argv.jsonl").unlink(missing_ok=True)
    proc = run(folder, ["bash", "-euo", "pipefail", "-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (folder / "argv.jsonl").read_text().splitlines()
    assert len(lines) == len(commands(script))  # every command went to the recorder
    monkeypatch.chdir(folder)
    for line in lines:
        argv = json.loads(line)
        try:
            code = main(argv)
        except SystemExit as exit_:  # --help
            code = exit_.code
        assert code == 0, f"retnet {' '.join(argv)}:\n{capsys.readouterr().err[-3000:]}"


@pytest.mark.parametrize("unit", cases())
def test_readme_block_runs_as_written(unit: list[Block], folder, monkeypatch, capsys):
    if unit[0].lang != "python":
        run_shell(folder, unit[0].text, monkeypatch, capsys)
        return
    payload = json.dumps([("README.md", b.line, b.text) for b in unit])
    proc = run(folder, [sys.executable, "-c", DRIVER, payload])
    lines = ", ".join(str(b.line) for b in unit)
    assert proc.returncode == 0, f"README.md blocks at lines {lines}:\n{proc.stderr[-3000:]}"


def test_the_rules_run_the_blocks_they_mean_to():
    """The blocks the rules run include the Quickstart, the Generation section's python and
    shell, the transformers snippet and the command line's shell: a rule or a README edit
    that quietly stops running one of them fails here."""
    found = blocks(README.read_text(encoding="utf-8"))
    run = {b.key for b in found if not_run(b) is None}
    assert {"quickstart-python-python", "generation-python", "generation-sh",
            "hugging-face-lm-python", "command-line-sh"} <= run
    assert all(b.lang == "python" or b.lang in SHELLS for b in found if not_run(b) is None)
