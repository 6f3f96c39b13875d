"""The CI contract: a skip in CI fails the run unless allowed with a reason, and an empty
collection fails too (so `.ci/run` proves the parity tests ran)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _run(tmp_path: Path, body: str, allowed: str = "", ci: bool = True) -> int:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "skips_allowed.txt").write_text(allowed)
    (tmp_path / "test_sample.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode


SKIPPING = "import pytest\ndef test_parity():\n    pytest.importorskip('no_such_module')\n"


def test_a_skip_in_ci_fails_unless_allowed_with_a_reason(tmp_path):
    assert _run(tmp_path, SKIPPING) == 1
    assert _run(tmp_path, SKIPPING, ci=False) == 0
    allowed = "test_sample.py::test_parity :: needs a GPU\n"
    assert _run(tmp_path, SKIPPING, allowed=allowed) == 0
    assert _run(tmp_path, SKIPPING, allowed="test_sample.py::test_parity\n") != 0  # no reason


def test_no_tests_collected_fails(tmp_path):
    assert _run(tmp_path, "x = 1\n") == 1


def test_the_ci_script_runs_the_readme_test_command():
    readme = (TESTS.parent / "README.md").read_text()
    ci = (TESTS.parent / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if "pytest" in line and "pip install" in line]
    assert commands and commands[0].strip() in ci.splitlines()
