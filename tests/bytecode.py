"""Whether a Python environment carries its modules' bytecode, asked of the environment's own
interpreter: one check for the images (tests/images/test_bytecode.py) and for `make vllm`'s
environment (tests/integration/test_vllm_engine.py). Where PYTHONDONTWRITEBYTECODE is set (CI,
the images), nothing writes that cache later, and every start compiles from source.

Imported by those tests through `sys.path`, as tests/otlp_receiver.py is.
"""

from __future__ import annotations

from collections.abc import Sequence

# For each path (relative to an import root on sys.path): is its source there, and its
# compiled bytecode beside it?
_SCRIPT = ("import importlib.util, os, sys\n"
           "for rel in sys.argv[1:]:\n"
           "    roots = [p for p in sys.path if p and os.path.exists(os.path.join(p, rel))]\n"
           "    print(rel, bool(roots) and os.path.exists(importlib.util.cache_from_source(os.path.join(roots[0], rel))))\n")


def check_args(modules: Sequence[str]) -> list[str]:
    """The interpreter's arguments that print one `<path> True|False` line per module path."""
    return ["-c", _SCRIPT, *modules]


def compiled(out: str) -> dict[str, bool]:
    """Pure: what those lines say, path -> whether its bytecode is there."""
    return {rel: flag == "True" for rel, flag in (line.split() for line in out.splitlines())}
