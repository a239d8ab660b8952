"""scripts/tagged.sh, through which `make test` runs its two pytest runs side by side: each line
of a run's output (stderr too) says whose it is, and the run's exit status survives the pipe, so
a failing tier still fails `make test`."""

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tagged.sh"


def test_every_line_is_tagged_and_the_commands_failure_is_kept():
    proc = subprocess.run(["bash", str(SCRIPT), "node-tier", "bash", "-c", "echo one; echo two >&2; printf dots; exit 3"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert proc.stdout.splitlines() == ["[node-tier] one", "[node-tier] two", "[node-tier] dots"]


def test_a_command_that_succeeds_exits_zero():
    assert subprocess.run(["bash", str(SCRIPT), "t", "true"], timeout=30).returncode == 0
