"""The worker's command line has one home, WorkerSettings: what `to_args` writes (for the
operator's pods and `modelfleet serve`'s children), the `modelfleet worker` parser reads back
as the same settings, field for field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from modelfleet.cli import WorkerSettings, build_parser, worker_settings

DEFAULTS = WorkerSettings(source="/models/tiny", served_names=["tiny"])
# Every field away from its default, so that a flag written but not read (or the reverse) shows.
CHANGED = WorkerSettings(
    source="hf://org/name@v1", served_names=["chat", "alias-1", "org/alias"], host="0.0.0.0", port=9001,
    device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=8, max_num_batched_tokens=512,
    drain_timeout=12.5, enable_prefix_caching=False, prefix_cache_gib=0.25, kv_cache_gib=3.0,
    lora_modules=(("sql", "/adapters/sql"), ("odd", "/adapters/a,b")), max_loras=2, max_lora_rank=64,
    prepack_weights=False,
)


def round_trip(settings: WorkerSettings) -> WorkerSettings:
    return worker_settings(build_parser().parse_args(["worker", *settings.to_args()]))


def test_the_changed_settings_change_every_field() -> None:
    fields = [f.name for f in dataclasses.fields(WorkerSettings)]
    assert [f for f in fields if getattr(CHANGED, f) == getattr(DEFAULTS, f)] == []


@pytest.mark.parametrize("settings", [DEFAULTS, CHANGED,
                                      dataclasses.replace(CHANGED, enable_prefix_caching=True, drain_timeout=120)])
def test_settings_survive_the_command_line(settings: WorkerSettings) -> None:
    assert round_trip(settings) == settings


def test_the_parsers_defaults_are_the_settings_defaults() -> None:
    parsed = worker_settings(build_parser().parse_args(["worker", "--model", "/models/tiny"]))
    assert parsed == DEFAULTS


def test_where_the_worker_runs_is_always_written_and_tuning_only_when_asked() -> None:
    assert DEFAULTS.to_args() == ["--model", "/models/tiny", "--served-name", "tiny", "--host", "127.0.0.1",
                                  "--port", "8000", "--device", "auto", "--dtype", "auto", "--drain-timeout", "30"]


def test_the_operator_does_not_import_the_model_stack() -> None:
    """render.py writes the worker's command line from the control-plane image, which has no torch."""
    code = ("import sys; import modelfleet.operator.render; "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]"]
