"""modelfleet's own engine and vLLM's CPU build on the same model in the same run, each directly
and through modelfleet's gateway, at 1, 32 and 128 concurrent clients.

The model is the random-weight Llama of bench/worker_throughput.py (56M parameters: hidden 512,
8 layers, head_dim 64, vocab 32000), which vLLM's CPU attention accepts (head_dim >= 32). Both
engines run in bfloat16 with one OpenMP thread each, so the other core is left to the client
and the gateway; every request streams exactly max_tokens (EOS ignored) from a completions
prompt. Rows are interleaved: at each concurrency, the four paths run back to back.

Ratios (the goal of the vLLM engine issue is `vllm_gateway_over_direct_at_32` >= 0.95):
  vllm_gateway_over_direct_at_N       what the gateway keeps of vLLM's own tokens/s
  modelfleet_gateway_over_direct_at_N the same for modelfleet's worker
  modelfleet_over_vllm_at_N           modelfleet's engine against vLLM, both direct

    make vllm && python bench/engines.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    finish_axes,
    free_port,
    print_table,
    ratio,
    start_worker,
    stop,
    wait_http,
    write_results,
)
from worker_throughput import http_load  # noqa: E402

from modelfleet.demo import BENCH_SPEC, ensure_demo_model  # noqa: E402
from modelfleet.engines import VLLM_SERVER_MODULE, VLLM_VERSION, VllmServer, find_vllm_python, vllm_env  # noqa: E402

ENGINES = ("modelfleet", "vllm")


def start_vllm(model: Path, max_num_seqs: int, log: Path, name: str = "bench", task: str = "generate",
               dtype: str = "bfloat16", omp_threads: int | None = 1) -> tuple[subprocess.Popen, str]:
    """vLLM's CPU build serving `model` on loopback, as modelfleet renders it (VllmServer);
    `omp_threads=None` leaves vLLM's own OpenMP setting."""
    python = find_vllm_python()
    if python is None:
        raise SystemExit("this bench needs vLLM: run `make vllm`")
    port = free_port()
    server = VllmServer(model=str(model), served_names=[name], host="127.0.0.1", port=port, dtype=dtype,
                        max_model_len=2048 if task == "generate" else None, max_num_seqs=max_num_seqs, task=task)
    env = {**os.environ, **vllm_env(gpu=False), "HF_HUB_OFFLINE": "1"}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    proc = subprocess.Popen([python, "-P", "-m", VLLM_SERVER_MODULE, *server.args()], env=env, cwd=log.parent,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    print(f"starting vLLM {VLLM_VERSION} (the first start compiles: a minute or two) ...", flush=True)
    wait_http(url + "/health", proc, timeout=900, log=log, interval=0.5)
    return proc, url


def start_gateway(backend: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet", "gateway", "--backend", f"bench={backend}",
                             "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", proc, timeout=120, log=log)
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per client (under 5 minutes)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    levels = [1, 32, 128]
    per_client = {1: 4 if args.quick else 12, 32: 1 if args.quick else 3, 128: 1}
    max_tokens = 32 if args.quick else args.max_tokens
    model = ensure_demo_model(BENCH_SPEC)
    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by modelfleet's worker
    procs: list[subprocess.Popen] = []
    try:
        mf, mf_url = start_worker(model, "bench", "--dtype", "bfloat16", "--max-num-seqs", "128",
                                  log=tmp / "modelfleet.log")
        procs.append(mf)
        vl, vl_url = start_vllm(model, 128, tmp / "vllm.log")
        procs.append(vl)
        urls = {"modelfleet": mf_url, "vllm": vl_url}
        for engine in ENGINES:
            gw, gw_url = start_gateway(urls[engine], tmp / f"gateway-{engine}.log")
            procs.append(gw)
            urls[f"{engine}+gateway"] = gw_url
        paths = [p for engine in ENGINES for p in (engine, f"{engine}+gateway")]
        for path in paths:  # warm-up: compile, caches, connections
            asyncio.run(http_load(urls[path], 4, 1, 8, True, 0.0))
        rows: list[dict[str, Any]] = []
        for level in levels:
            for path in paths:
                result = asyncio.run(http_load(urls[path], level, per_client[level], max_tokens, True, 0.0))
                row = {"path": path, "clients": level, **result}
                rows.append(row)
                print_table([row], ["path", "clients", "tokens_per_s", "latency_p50_ms", "ttft_p50_ms", "errors"])
    finally:
        for proc in procs:
            stop(proc)

    def tps(path: str, level: int) -> float | None:
        return next((r["tokens_per_s"] for r in rows if r["path"] == path and r["clients"] == level), None)

    ratios: dict[str, Any] = {}
    for level in levels:
        ratios[f"vllm_gateway_over_direct_at_{level}"] = ratio(tps("vllm+gateway", level), tps("vllm", level))
        ratios[f"modelfleet_gateway_over_direct_at_{level}"] = ratio(tps("modelfleet+gateway", level),
                                                                     tps("modelfleet", level))
        ratios[f"modelfleet_over_vllm_at_{level}"] = ratio(tps("modelfleet", level), tps("vllm", level))
    ratios["goal_vllm_gateway_over_direct_at_32"] = 0.95
    print()
    print_table(rows, ["path", "clients", "tokens_per_s", "latency_p50_ms", "ttft_p50_ms", "errors"])
    print("\nratios:", ratios)

    def plot(ax) -> None:
        for path in paths:
            points = [(r["clients"], r["tokens_per_s"]) for r in rows if r["path"] == path]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=path)
        finish_axes(ax, "concurrent clients", "generated tokens/s", "modelfleet and vLLM engines, direct and through the gateway")

    config = {"model": BENCH_SPEC.key(), "vllm": VLLM_VERSION, "dtype": "bfloat16", "omp_threads": 1,
              "max_tokens": max_tokens, "per_client": per_client, "quick": args.quick}
    print("wrote", write_results("engines", config, rows, ratios, plot))


if __name__ == "__main__":
    main()
