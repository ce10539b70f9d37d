"""Run a real upstream ``mlx_lm.server`` for tests and the demo.

Why: a fake upstream only proves what we already believe. These helpers start the real
server on loopback against a tiny model (see ``tiny_model.py`` here), so tests meet its
actual quirks. Only stdlib is used (urllib, subprocess, socket).

Facts observed by hand (mlx-lm 0.32.2, mlx 0.32.4, Linux x86_64, 2 cores, tiny model):
- Start-up: GET /health answered 200 {"status": "ok"} 1.5 s after Popen (cold), ~1 s when
  warm (the demo's two nodes were both healthy 1.0 s after start). /health is up BEFORE the
  --model weights are loaded: loading happens in the generation thread, so the first
  request took 1.18 s; later ones 0.01-0.07 s for 5 tokens.
- Log: "Calling `python -m mlx_lm.server...` directly is deprecated" (still works), plus a
  "not recommended for production" UserWarning and one access-log line per request.
- Responses are HTTP/1.0, Server: BaseHTTP/0.6 Python/3.11.7, Access-Control-Allow-*: *;
  unary has Content-Length, streams (Content-type: text/event-stream, Cache-Control:
  no-cache) have none and end by closing the connection.
- "model" picks the model: a request naming another tiny model directory was served by it
  (load + answer in 0.068 s); switching back gave the first model's output again. The echo
  is exactly the requested value: "/tmp/tm/a", "/tmp/tm/b", or "default_model" when the
  body says "default_model" or omits "model".
- Prompt cache survives model switches: a repeated prompt reported
  prompt_tokens_details.cached_tokens 15 of 16 on the next visit to that model.
- Unary chat: {"id": "chatcmpl-<uuid>", "system_fingerprint":
  "0.32.2-0.32.4-Linux-6.18.44-fc-v669-x86_64-with-glibc2.36-x86_64", "object":
  "chat.completion", "model": "/tmp/tm/a", "created": 1795613615, "choices": [{"index": 0,
  "finish_reason": "length", "message": {"role": "assistant", "content": "\n\n\n\n\n"}}],
  "usage": {"prompt_tokens": 16, "completion_tokens": 5, "total_tokens": 21,
  "prompt_tokens_details": {"cached_tokens": 0}}}
- Stream: ": keepalive N/M" comment lines (one per prompt-processing step) first, then one
  "data: {... "object": "chat.completion.chunk" ...}" per token, each delta carrying
  {"role": "assistant", "content": ...}; the last chunk has finish_reason "length"/"stop"
  and delta {"role": "assistant"} only; with stream_options.include_usage an extra event
  {"object": "chat.completion", "choices": [], "usage": {...}}; then "data: [DONE]".
- /v1/completions: "object": "text_completion", id "cmpl-<uuid>", choices[0].text; streamed
  chunks are also "text_completion", the last with text "" and finish_reason "length".
- Errors: "nope/nope" -> 404 {"error": "Cannot find an appropriate cached snapshot folder
  ..."}; a missing absolute directory -> 404 {"error": "Repo id must be in the form
  'repo_name' or 'namespace/repo_name': '/tmp/tm/missing'. ..."}.
- GET /v1/models with no HF cache: 200 with an empty body (the server logs a
  CacheNotFound traceback).
- With temperature 0 (the default) the random models mostly repeat one token ("\n" or
  "ession"); different seeds give different outputs for the same prompt.
- stop(): SIGTERM ends the server at once (returncode -15, 0.01 s).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port (racy, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlx_server(
    model_dir: pathlib.Path | str, port: int, log_path: pathlib.Path | str
) -> subprocess.Popen[bytes]:
    """Start ``mlx_lm.server`` on 127.0.0.1:``port`` serving ``model_dir``.

    Offline env vars stop it from ever reaching Hugging Face; stdout and stderr go to
    ``log_path`` so a failing test can show the server's side of the story.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm.server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    finally:
        log.close()  # the child holds its own descriptor


def wait_healthy(
    url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``GET {url}/health`` until it answers 200, or raise ``TimeoutError``.

    If ``proc`` is given and exits first, raise ``RuntimeError`` at once instead of
    waiting out the timeout.
    """
    health = url.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    for _ in range(int(timeout / 0.1) + 1):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {health} was up")
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = repr(exc)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    raise TimeoutError(f"{health} not healthy after {timeout}s: {last_error}")


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate ``proc`` by PID, then kill it if it is still alive after ``grace`` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=grace)
