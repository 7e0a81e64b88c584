"""The real components the end-to-end checks run against: llama-servers with a real model, and `llmctl serve-proxy`
in front of them. Servers start lazily (a test that needs none starts none), listen on 127.0.0.1 only, on free ports
in 18200-18299, and are all stopped by `Stack.close()`.

Shared by the pytest suite (conftest.py) and by conformance.py, so both run the very same checks on the very same
setup.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PORTS = range(18200, 18300)
STACK_VARS = ("LLMCTL_LLAMA_SERVER", "LLMCTL_LLAMA_TEMPLATES", "LLMCTL_TEST_MODEL")
# Long enough for a cold start of llama-server on 2 busy cores; a server that is not up by then is broken.
START_DEADLINE_S = 180
# A client model name that is not the upstream's: the response must echo it.
CLIENT_MODEL = "claude-opus-4-8"  # what Claude Code 2.1.197 sends by default


def _die_with_parent() -> None:
    """In the child, before exec: if the test harness dies (killed, crashed), the kernel stops the server too."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class StackError(RuntimeError):
    """The test stack is missing or a component failed to start: the message says what and how to fix it."""


def require_env(*names: str) -> dict[str, str]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise StackError(
            f"missing environment variable(s) {', '.join(missing)}: the end-to-end tests need the real test stack; "
            'run `eval "$(bash scripts/test-stack.sh)"` first (or use `bash scripts/test.sh`)'
        )
    for n in names:
        if n != "LLMCTL_LLAMA_TEMPLATES" and not Path(os.environ[n]).exists():
            raise StackError(f"{n}={os.environ[n]} does not exist: rebuild the stack with `bash scripts/test-stack.sh`")
    return {n: os.environ[n] for n in names}


def llmctl_bin() -> Path:
    path = Path(os.environ.get("LLMCTL_BIN") or ROOT / "target" / "debug" / "llmctl")
    if not path.is_file():
        raise StackError(f"llmctl binary not found at {path}: run `cargo build` (or set LLMCTL_BIN)")
    return path


_taken: set[int] = set()


def free_port() -> int:
    for port in PORTS:
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise StackError(f"no free port in {PORTS.start}-{PORTS.stop - 1} on 127.0.0.1")


def http_json(method: str, url: str, body: object | None = None, key: str | None = None, timeout: float = 60) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    url: str

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class Stack:
    def __init__(self) -> None:
        self.env = require_env(*STACK_VARS)
        self.dir = Path(tempfile.mkdtemp(prefix="llmctl-e2e-"))
        self.procs: list[Proc] = []
        self._llamas: dict[str, str] = {}
        self._proxies: dict[tuple, str] = {}
        self.keys: dict[str, str] = {}

    # --- upstreams -------------------------------------------------------------------------------------------------
    def llama(self, role: str) -> str:
        """URL of llama-server `role`, started on first use.

        text:  SmolLM2 with its own ChatML template (ends turns naturally); one 32768-token slot so Claude Code's
               ~20k-token first prompt fits.
        tools: same model with the Gemma 4 template: real tool calls, `tool_choice: required` grammar. Greedy by
               default (`--temp 0`) so that runs are repeatable.
        claude: like text, for Claude Code's long max_tokens: SmolLM2's end-of-turn token (id 2, `<|im_end|>`) gets
               a +5 logit bias, a sampling setting that keeps its free-form replies short on a CPU (unbiased, it
               can ramble for thousands of tokens; with +3 one CI run passed 8,660 tokens of a 64,000 max_tokens
               reply at 16 tokens/s; with +5, 6 of 6 Claude Code replies ended by themselves after 13-101 tokens).
               Capping max_tokens instead is no way out: Claude Code reports a reply cut by max_tokens as an error.
        small: a 512-token context, to provoke "prompt is too long".
        metrics: a 4096-token context with `--metrics` (its Prometheus /metrics, which the dashboard reads).
        keyed: llama-server's own API-key check (only the llama.cpp-native target uses it).
        """
        if role in self._llamas:
            return self._llamas[role]
        big = ["-c", "32768", "-np", "1", "--override-kv", "llama.context_length=int:32768"]
        args = {
            "text": big,
            "claude": big + ["--logit-bias", "2+5"],
            "tools": big
            + ["--jinja", "--chat-template-file", f"{self.env['LLMCTL_LLAMA_TEMPLATES']}/google-gemma-4-31B-it.jinja"]
            + ["--temp", "0", "--seed", "42"],
            "small": ["-c", "512", "-np", "1"],
            "metrics": ["-c", "4096", "-np", "1", "--metrics"],
            "keyed": ["-c", "2048", "-np", "1"],
        }[role]
        if role == "keyed":
            key = "e2e-native-key"
            key_file = self.dir / "llama-keys"
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            args = args + ["--api-key-file", str(key_file)]
            self.keys["keyed"] = key
        port = free_port()
        # --no-repack: on CPUs with AMX, this build's AMX repacked matmul segfaults while loading the model
        # (ggml_backend_amx_mul_mat, seen 2026-12-03); plain CPU kernels work everywhere.
        cmd = [self.env["LLMCTL_LLAMA_SERVER"], "-m", self.env["LLMCTL_TEST_MODEL"], "--host", "127.0.0.1",
               "--port", str(port), "--no-webui", "--no-repack", *args]
        url = f"http://127.0.0.1:{port}"
        self._start(f"llama-{role}", cmd, url, os.environ.copy())
        self._llamas[role] = url
        return url

    # --- proxies ---------------------------------------------------------------------------------------------------
    def proxy(self, upstream: str, api_key: str | None = None) -> str:
        """URL of an `llmctl serve-proxy` in front of `upstream`; the key, if any, goes in by env, never argv."""
        k = (upstream, api_key)
        if k in self._proxies:
            return self._proxies[k]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = os.environ.copy()
        env.pop("LLMCTL_PROXY_API_KEY", None)
        if api_key:
            env["LLMCTL_PROXY_API_KEY"] = api_key
        env.setdefault("RUST_LOG", "info")
        cmd = [str(llmctl_bin()), "serve-proxy", "--listen", f"127.0.0.1:{port}", "--upstream", upstream]
        self._start(f"llmctl-{port}", cmd, url, env)
        self._proxies[k] = url
        return url

    def dead_url(self) -> str:
        """An address in our range where nothing listens: an upstream that is down."""
        if "dead" not in self._llamas:
            self._llamas["dead"] = f"http://127.0.0.1:{free_port()}"
        return self._llamas["dead"]

    # --- process handling ------------------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], url: str, env: dict[str, str]) -> None:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        proc = Proc(name, popen, log, url)
        self.procs.append(proc)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise StackError(f"{name} exited with status {popen.returncode} at start ({' '.join(cmd)}):\n{proc.log_tail()}")
            try:
                status, _ = http_json("GET", f"{url}/health", timeout=5)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.3)
        raise StackError(f"{name} did not answer 200 on {url}/health within {START_DEADLINE_S}s:\n{proc.log_tail()}")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.procs.clear()
        if not os.environ.get("LLMCTL_E2E_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"server logs kept in {self.dir}")


class Target:
    """One Anthropic-compatible endpoint family under test. Checks use only this interface, so the same checks run
    against llmctl and against llama-server's native /v1/messages."""

    name: str

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def upstream(self, role: str) -> str:
        return self.stack.llama(role)

    def endpoint(self, role: str) -> tuple[str, str | None]:
        """(base URL, API key) of the endpoint for `role`: text, tools, small, down, auth."""
        raise NotImplementedError


class LlmctlTarget(Target):
    name = "llmctl serve-proxy"
    KEY = "e2e-proxy-key"

    def endpoint(self, role: str) -> tuple[str, str | None]:
        if role == "down":
            return self.stack.proxy(self.stack.dead_url()), None
        if role in ("text", "auth"):
            return self.stack.proxy(self.stack.llama("text"), self.KEY), self.KEY
        if role == "claude":
            return self.stack.proxy(self.stack.llama("claude"), self.KEY), self.KEY
        return self.stack.proxy(self.stack.llama(role)), None


class NativeTarget(Target):
    name = "llama.cpp native /v1/messages"

    def endpoint(self, role: str) -> tuple[str, str | None]:
        if role == "down":
            return self.stack.dead_url(), None
        if role == "auth":
            url = self.stack.llama("keyed")
            return url, self.stack.keys["keyed"]
        return self.stack.llama(role), None


TARGETS = {"llmctl": LlmctlTarget, "native": NativeTarget}
