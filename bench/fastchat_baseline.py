"""Baseline (d) of the throughput benchmark: FastChat's `model_worker` serving the same model.

modelfleet replaces FastChat, so the benchmark measures FastChat's own worker (PyPI `fschat`) on the
same weights, through HTTP, in the same run. That needs three things this module provides:

* a virtualenv of its own (`ensure_venv`): fschat 0.2.36 only works with transformers < 4.47, while
  modelfleet runs transformers 5. The venv sees the system site-packages so it reuses the large
  system torch instead of downloading another one; only transformers 4.46 and FastChat's small
  dependencies are installed into it, and they shadow the system's versions inside the venv.
* a copy of the model that transformers 4.46 can read (`compatible_copy`): our models are written by
  transformers 5, whose config and tokenizer files use names 4.46 does not know. The copy shares the
  weights file and is checked to compute the same tokens as the original under transformers 5.
* a launcher and a client for FastChat's streaming protocol (`start_fastchat_worker`,
  `fastchat_generate`).

Run it alone for a smoke test: `python bench/fastchat_baseline.py [--tiny]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

FSCHAT_VERSION = "0.2.36"
TRANSFORMERS_SPEC = "transformers>=4.46,<4.47"
# fschat's `model_worker` extra pulls in accelerate, peft, sentencepiece, protobuf and torch; torch is
# pinned (through a constraints file) to the system's version so pip never downloads another one.
REQUIREMENTS = [f"fschat[model_worker]=={FSCHAT_VERSION}", TRANSFORMERS_SPEC]
VENV_READY = ".modelfleet-ready"
COPY_READY = ".modelfleet-verified.json"
MODEL_NAME = "bench"


class FastChatUnavailable(RuntimeError):
    """FastChat could not be set up or started; the message is one line saying why."""


# --------------------------------------------------------------------------------------------- paths


def bench_cache() -> Path:
    """`${MODELFLEET_CACHE:-~/.cache/modelfleet}/bench`, the same root modelfleet.demo uses."""
    root = os.environ.get("MODELFLEET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "modelfleet")
    return Path(root) / "bench"


def venv_dir() -> Path:
    return bench_cache() / "fastchat-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialises set-up between processes (two benchmark runs must not build one venv at once)."""
    bench_cache().mkdir(parents=True, exist_ok=True)
    with open(bench_cache() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(message: str) -> None:
    print(f"[fastchat-baseline] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- venv


def _venv_key() -> str:
    """What the venv was built for: a change of system torch or of our pins rebuilds it."""
    torch_version = importlib.metadata.version("torch")
    return json.dumps(
        {"requirements": REQUIREMENTS, "torch": torch_version, "python": sys.version.split()[0]}
    )


def _run_pip(python: Path, args: list[str], log: Path) -> None:
    """Runs pip at low priority (the 2 cores are shared), echoing its progress lines.

    The whole output goes to `log`; a failure raises with pip's last error line and the log's path."""
    command = ["nice", "-n", "10", str(python), "-m", "pip", "install", "--progress-bar", "off", *args]
    last_error = ""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            stripped = line.strip()
            if stripped.startswith(("Collecting", "Installing", "Successfully")):
                _say(f"  pip: {stripped}")
            if stripped.startswith("ERROR"):
                last_error = stripped
        code = proc.wait()
    if code != 0:
        raise FastChatUnavailable(
            f"pip install into the FastChat venv failed ({last_error or f'exit {code}'}); log: {log}"
        )


def _share_outer_venv(venv: Path) -> None:
    """When this process itself runs in a virtualenv, `--system-site-packages` would only expose the
    base interpreter's packages; a .pth file appends ours (after the venv's own, so they still win)."""
    if sys.prefix == sys.base_prefix:
        return
    import site

    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    target = next((venv / "lib").glob("python*/site-packages"))
    (target / "zz-modelfleet-outer-venv.pth").write_text("\n".join(paths) + "\n")


def _check_venv(python: Path) -> str:
    """Imports FastChat's worker in the venv; returns the transformers version it sees."""
    probe = (
        "import sys, fastchat, transformers, torch, fastchat.serve.model_worker;"
        # model_worker's logger takes over sys.stdout when imported, hence __stdout__.
        "print(transformers.__version__, torch.__version__, file=sys.__stdout__)"
    )
    # LOGDIR="" stops FastChat's logger writing model_worker_*.log into the working directory.
    env = {**os.environ, "LOGDIR": ""}
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FastChatUnavailable(f"FastChat venv {python.parent.parent} does not import: {tail}")
    transformers_version, torch_version = done.stdout.split()
    if not transformers_version.startswith("4.46."):
        raise FastChatUnavailable(f"FastChat venv has transformers {transformers_version}, expected 4.46.x")
    return f"transformers {transformers_version}, torch {torch_version}"


def ensure_venv() -> Path:
    """The python of a cached virtualenv with fschat and transformers 4.46 (torch from the system).

    Built once (about a minute, most of it pip), then reused while the marker file matches the pins
    and the system torch; a half-built venv is rebuilt from scratch."""
    venv = venv_dir()
    python = venv_python(venv)
    with _locked("fastchat-venv"):
        marker = venv / VENV_READY
        if python.exists() and marker.exists() and marker.read_text() == _venv_key():
            return python
        started = time.monotonic()
        _say(f"creating virtualenv {venv} (system site-packages: reuses the system torch)")
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise FastChatUnavailable(f"python -m venv failed: {made.stderr.strip().splitlines()[-1:]}")
        _share_outer_venv(venv)
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={importlib.metadata.version('torch')}\n")
        _say(f"installing {', '.join(REQUIREMENTS)} (nice'd; the log is {venv / 'pip.log'})")
        _run_pip(python, ["-c", str(constraints), *REQUIREMENTS], venv / "pip.log")
        _say(f"checking the venv imports FastChat: {_check_venv(python)}")
        marker.write_text(_venv_key())
        _say(f"FastChat venv ready in {time.monotonic() - started:.0f}s")
        return python


# ------------------------------------------------------------------------------- compatible model copy


def _config_for_446(config: dict) -> dict:
    """transformers 5's config.json, in the names 4.46 reads; every number is carried over as is.

    v5 keeps rope settings in `rope_parameters` (theta plus type and scaling) where 4.46 reads
    `rope_theta` and `rope_scaling`, and calls the weights' dtype `dtype` instead of `torch_dtype`."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        out["rope_theta"] = rope.pop("rope_theta", out.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", "default")
        out["rope_scaling"] = None if kind == "default" and len(rope) <= 1 else rope
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    out["transformers_version"] = "4.46.3"
    return out


def _tokenizer_config_for_446(config: dict, chat_template: str | None) -> dict:
    """transformers 5's tokenizer_config.json for 4.46: the generic fast tokenizer over tokenizer.json.

    v5 names its tokenizers-backed class `TokenizersBackend`, which 4.46 lacks; `PreTrainedTokenizerFast`
    reads the same tokenizer.json. The special tokens (eos `<|im_end|>`, pad `<|endoftext|>`) and
    the chat template (a separate .jinja file in v5, a key here) are carried over."""
    out = {k: v for k, v in config.items() if k not in ("backend", "extra_special_tokens", "tokenizer_class")}
    out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = extra
    if chat_template is not None:
        out["chat_template"] = chat_template
    return out


def _link_or_copy(source: Path, target: Path) -> None:
    """Weights are shared by hard link when possible (same bytes, no 200 MB copy)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_copy(model_dir: Path, target: Path) -> None:
    for path in model_dir.iterdir():
        if path.name in ("config.json", "tokenizer_config.json", "chat_template.jinja") or path.is_dir():
            continue
        _link_or_copy(path, target / path.name)
    config = json.loads((model_dir / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(_config_for_446(config), indent=2) + "\n")
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else None
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config_for_446(tok_config, template), indent=2) + "\n"
    )


# Run by both interpreters (transformers 5 on the original, 4.46 on the copy): prompt ids, a few greedy
# tokens from a plain forward loop (no generate(), whose defaults differ between versions), and the last
# position's top-8 token ids and first logits (a random model's greedy run soon repeats one token).
_FINGERPRINT = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
kw = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
chat = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True)
ids = tok(chat).input_ids
prompt_ids = list(ids)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
    head = logits[:16].tolist()
    top = logits.topk(8).indices.tolist()
    for _ in range(8):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
print(json.dumps({"prompt_ids": prompt_ids, "greedy": ids[len(prompt_ids):], "logits": head, "top": top,
                  "eos": tok.eos_token_id, "pad": tok.pad_token_id, "version": transformers.__version__}))
"""


def _fingerprint(python: Path | str, model_dir: Path) -> dict:
    done = subprocess.run([str(python), "-c", _FINGERPRINT, str(model_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FastChatUnavailable(f"loading {model_dir.name} with {python} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _verify_same_model(python: Path, original: Path, copy: Path) -> dict:
    """Proves the copy is the same model: same tokens, same greedy continuation, same logits."""
    reference = _fingerprint(sys.executable, original)
    candidate = _fingerprint(python, copy)
    for key in ("prompt_ids", "top", "greedy", "eos", "pad"):
        if reference[key] != candidate[key]:
            raise FastChatUnavailable(
                f"the 4.46 copy of {original.name} differs from the original in {key}: "
                f"{candidate[key]} (4.46) vs {reference[key]} (v5)"
            )
    diff = max(abs(a - b) for a, b in zip(reference["logits"], candidate["logits"], strict=True))
    if diff > 1e-3:
        raise FastChatUnavailable(f"the 4.46 copy of {original.name} gives logits off by {diff:.2g}")
    return {
        "greedy": candidate["greedy"],
        "max_logit_diff": diff,
        "versions": [reference["version"], candidate["version"]],
    }


def compatible_copy(model_dir: Path) -> Path:
    """A copy of a transformers-5 model directory that transformers 4.46 (and so FastChat) loads.

    Cached under the bench cache by the model directory's name, built in a temporary directory and
    renamed only after it is verified to compute the same tokens as the original."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").exists() or not (model_dir / "tokenizer_config.json").exists():
        raise FastChatUnavailable(
            f"{model_dir} is not a transformers model directory (no config.json/tokenizer_config.json)"
        )
    python = ensure_venv()
    target = bench_cache() / "fastchat-models" / model_dir.name
    with _locked("fastchat-models"):
        if (target / COPY_READY).exists():
            return target
        _say(f"writing a transformers-4.46 copy of {model_dir.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            _write_copy(model_dir, tmp)
            _say("checking the copy computes the same tokens under 4.46 as the original under v5")
            proof = _verify_same_model(python, model_dir, tmp)
            (tmp / COPY_READY).write_text(json.dumps(proof) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"same model: greedy {proof['greedy']}, max logit diff {proof['max_logit_diff']:.2g}")
        return target


# -------------------------------------------------------------------------------------------- worker


def free_port() -> int:
    """A free loopback port (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _worker_command(python: Path, model: Path, port: int, stream_interval: int) -> list[str]:
    """FastChat 0.2.36's flags. `--no-register` means no controller is needed (the controller address
    is pointed at loopback all the same); the concurrency limit is raised so FastChat's semaphore is
    not what limits it; `--stream-interval 1` sends one chunk per token, like our worker."""
    address = f"http://127.0.0.1:{port}"
    return [
        str(python), "-m", "fastchat.serve.model_worker",
        "--model-path", str(model), "--model-names", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--worker-address", address,
        "--controller-address", "http://127.0.0.1:9", "--no-register",
        "--device", "cpu", "--limit-worker-concurrency", "1024", "--stream-interval", str(stream_interval),
    ]  # fmt: skip


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FastChatUnavailable(
                f"FastChat worker exited with code {proc.returncode} while starting; log tail:\n{_log_tail(log_path)}"
            )
        try:
            if httpx.post(f"{url}/worker_get_status", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_fastchat_worker(proc)
    raise FastChatUnavailable(
        f"FastChat worker not ready after {timeout:.0f}s; log tail:\n{_log_tail(log_path)}"
    )


def start_fastchat_worker(
    model_dir: Path, port: int, log_path: Path, stream_interval: int = 1, timeout: float = 300.0
) -> subprocess.Popen:
    """Starts FastChat's model_worker on 127.0.0.1:`port` serving `model_dir` (as model "bench") and
    returns once it answers /worker_get_status. Its output goes to `log_path`; stop it with
    `stop_fastchat_worker`."""
    python = ensure_venv()
    model = compatible_copy(model_dir)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOGDIR": "", "PYTHONUNBUFFERED": "1"}  # LOGDIR: see _check_venv
    _say(f"starting FastChat model_worker on 127.0.0.1:{port} (log: {log_path})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _worker_command(python, model, port, stream_interval),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip
    _wait_ready(proc, f"http://127.0.0.1:{port}", log_path, timeout)
    return proc


def stop_fastchat_worker(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -------------------------------------------------------------------------------------------- client


def _request_body(prompt: str, max_new_tokens: int, temperature: float) -> dict:
    """FastChat's generate_stream parameters. No stop string and no extra stop ids, so a request runs
    for `max_new_tokens` unless the model samples EOS: FastChat always adds the tokenizer's EOS id to
    the stop ids and offers no way to turn that off."""
    return {
        "model": MODEL_NAME,
        "prompt": prompt,
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "max_new_tokens": max_new_tokens,
        "stop": None,
        "stop_token_ids": [],
        "echo": False,
    }


def _tokens_generated(last: dict, max_new_tokens: int) -> int:
    """Tokens the model sampled, from FastChat's final chunk.

    FastChat's `usage.completion_tokens` is its loop index: max_new_tokens - 1 after a full-length
    run, and the count before the EOS token when it stopped. Both undercount the sampled tokens (each
    one a decode step) by one, so that one is added back; the EOS counts, as in OpenAI-style usage."""
    if last.get("finish_reason") == "length":
        return max_new_tokens
    return int(last.get("usage", {}).get("completion_tokens", 0)) + 1


async def fastchat_generate(
    client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int, temperature: float = 1.0
) -> tuple[int, float | None, list[float]]:
    """One streaming request to FastChat's `/worker_generate_stream` at worker base URL `url`.

    Returns (tokens generated, seconds to the first chunk, each chunk's arrival time in seconds from
    the request's start). With `--stream-interval 1` a chunk is one token (the final chunk repeats the
    last one with a finish reason). Chunks are JSON objects ended by a NUL byte."""
    body = _request_body(prompt, max_new_tokens, temperature)
    started = time.perf_counter()
    arrivals: list[float] = []
    last: dict = {}
    buffer = b""
    async with client.stream("POST", f"{url.rstrip('/')}/worker_generate_stream", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"FastChat answered {response.status_code}: {response.text[:200]}")
        async for data in response.aiter_bytes():
            buffer += data
            *chunks, buffer = buffer.split(b"\0")
            for chunk in chunks:
                if not chunk:
                    continue
                arrivals.append(time.perf_counter() - started)
                last = json.loads(chunk)
                if last.get("error_code", 0) != 0:
                    raise RuntimeError(f"FastChat error {last['error_code']}: {last.get('text', '')[:200]}")
    if not last:
        raise RuntimeError("FastChat closed the stream without a chunk")
    return _tokens_generated(last, max_new_tokens), (arrivals[0] if arrivals else None), arrivals


# ------------------------------------------------------------------------------------------ smoke run


async def _burst(url: str, concurrency: int, max_new_tokens: int) -> tuple[int, float, list[float]]:
    prompts = [
        f"<|im_start|>user\nTell me story number {i}.<|im_end|>\n<|im_start|>assistant\n"
        for i in range(concurrency)
    ]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(fastchat_generate(client, url, p, max_new_tokens) for p in prompts))
        elapsed = time.perf_counter() - started
    return sum(r[0] for r in results), elapsed, [r[1] or 0.0 for r in results]


def main() -> None:
    from modelfleet.demo import BENCH_SPEC, DemoSpec, ensure_demo_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny demo model (quick check)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    t0 = time.monotonic()
    ensure_venv()
    _say(f"venv: {time.monotonic() - t0:.1f}s")
    model_dir = ensure_demo_model(DemoSpec() if args.tiny else BENCH_SPEC)
    port = free_port()
    log = bench_cache() / "fastchat-worker.log"
    t0 = time.monotonic()
    proc = start_fastchat_worker(model_dir, port, log)
    _say(f"worker up in {time.monotonic() - t0:.1f}s (model {model_dir.name})")
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_burst(url, 1, 4))  # warm-up
        for n in args.concurrency:
            tokens, elapsed, ttfts = asyncio.run(_burst(url, n, args.tokens))
            print(
                f"FastChat  concurrency {n:3d}: {tokens:5d} tokens in {elapsed:6.2f}s = {tokens / elapsed:7.1f} tokens/s, "
                f"mean TTFT {sum(ttfts) / len(ttfts):.3f}s",
                flush=True,
            )
    finally:
        stop_fastchat_worker(proc)


if __name__ == "__main__":
    main()
