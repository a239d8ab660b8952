"""The pod launcher mounts every volume even when one hides another's source (an emptyDir on
/tmp while the cluster's pod files live under /tmp, as in a CI clone there)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).parent / "localkube" / "agent" / "launcher.py"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_volume_over_tmp_does_not_hide_later_sources(tmp_path):
    base = Path("/tmp") / f"launcher-test-{os.getpid()}"
    try:
        (base / "token").mkdir(parents=True)
        (base / "token" / "token").write_text("secret-token\n")
        (base / "emptydir").mkdir()
        spec = {"mounts": [[str(base / "emptydir"), "/tmp", False],
                           [str(base / "token"), "/var/run/secrets/kubernetes.io/serviceaccount", True]],
                "cwd": "/", "env": {"PATH": "/usr/bin:/bin"},
                "argv": ["sh", "-c", "cat /var/run/secrets/kubernetes.io/serviceaccount/token; ls -A /tmp | wc -l; "
                         f"test -f {LAUNCHER} && echo project-visible"]}
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(spec))
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(LAUNCHER),
                              str(spec_file)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split()
        assert lines[0] == "secret-token"
        # /tmp is the emptyDir: empty, unless the project itself lives under /tmp and was bound back.
        assert lines[1] == ("1" if str(LAUNCHER).startswith("/tmp/") else "0")
        assert lines[2] == "project-visible"
    finally:
        shutil.rmtree(base, ignore_errors=True)
