"""The harness's own tests use the e2e tier's fixtures (one definition, in tests/e2e) and
import `localkube` (the harness package) directly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # for `import localkube`; no repository-root conftest needed


def _load_e2e_conftest():
    path = HERE.parent / "e2e" / "conftest.py"
    spec = importlib.util.spec_from_file_location("modelfleet_e2e_fixtures", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_e2e = _load_e2e_conftest()
cluster = _e2e.cluster
namespace = _e2e.namespace
