"""The installed package, not the source tree: `make test` builds a non-editable install into
.venv-wheel (`make wheel`), and these tests run its `retnet` command in a folder outside the
repository, so that a command reading files from the repository (task files, templates)
fails here. The reference figures come from the source tree, in this process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from recall import save_recall_run

pytestmark = pytest.mark.slow  # each test runs the installed retnet command

ROOT = Path(__file__).resolve().parents[2]
WHEEL_BIN = ROOT / ".venv-wheel" / "bin"


@pytest.fixture(scope="module")
def installed() -> Path:
    retnet = WHEEL_BIN / "retnet"
    assert retnet.is_file(), "no .venv-wheel: build it with `make wheel` (`make test` does)"
    return retnet


def _run(installed: Path, args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(cwd)  # caches (tokenised corpora) go to the test's folder
    proc = subprocess.run([str(installed), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_installed_package_is_not_the_source_tree(installed, tmp_path):
    out = subprocess.run([str(WHEEL_BIN / "python"), "-c",
                          "import retnet, retnet.eval; print(retnet.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "site-packages" in out and str(ROOT / "src") not in out


def test_installed_eval_scores_like_the_source_tree(installed, tmp_path, corpus):
    from retnet.data import load_documents, split_documents
    from retnet.eval import perplexity, run_tasks
    from retnet.loading import load

    work = tmp_path / "elsewhere"
    work.mkdir()
    run = save_recall_run(tmp_path / "run")
    _run(installed, ["eval", "--checkpoint", str(run), "--tasks", "python_mc", "--limit", "6",
                     "--perplexity", str(corpus), "--out", "r.json"], work)
    got = json.loads((work / "r.json").read_text())

    model, tok = load(run)
    _, val = split_documents(load_documents(str(corpus)))
    want = perplexity(model, tok, [d.text for d in val])
    assert got["perplexity"]["tokens"] == want["tokens"]
    assert got["perplexity"]["nll_per_token"] == pytest.approx(want["nll_per_token"], rel=1e-9)
    tasks = run_tasks(model, tok, ["python_mc"], limit=6)
    assert got["tasks"]["python_mc"]["acc,none"] == tasks["python_mc"]["acc,none"]


def test_installed_compare_quick_runs_outside_the_repository(installed, tmp_path):
    _run(installed, ["compare", "--quick", "--out", "cmp"], tmp_path)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["retnet", "transformer"]
    for r in results["runs"]:  # the zero-shot task came from the installed package's files
        assert 0.0 <= r["zero_shot"]["python_mc"]["acc,none"] <= 1.0
        assert r["curve"][-1]["val_loss"] > 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| retnet |" in report and "| transformer |" in report
