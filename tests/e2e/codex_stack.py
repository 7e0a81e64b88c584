"""What the Codex CLI e2e files share: the recording pass-through, the fixtures (the Codex binary; per llama-server
role a serve-proxy with a recorder on each side, and at the end of the session the Responses grammar checked on
every stream Codex read), `llmctl client-config codex` into a fresh CODEX_HOME, and one `codex exec` run."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from responses_grammar import validate
from stack import StackError, free_port, llmctl_bin, require_env

RUN_TIMEOUT_S = 900
KEY_ENV = "LLMCTL_CODEX_TEST_KEY"  # the proxy's key reaches Codex by this variable (config.toml: env_key)
KEY = "codex-e2e-key"


class Recorder:
    """A plain HTTP pass-through to `upstream` that keeps the JSON body of every POST it forwards (and, with
    `keep_answers`, the raw answer to each). The answer is relayed chunk by chunk, so streaming (and serve-proxy's
    early prompt-progress reading) works as without it."""

    def __init__(self, upstream: str, keep_answers: bool = False) -> None:
        self.upstream = upstream
        self.requests: list[dict] = []
        self.answers: list[dict] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                if self.command == "POST" and body:
                    try:
                        rec.requests.append({"path": self.path, "body": json.loads(body)})
                    except ValueError:
                        rec.requests.append({"path": self.path, "body": None})
                req = urllib.request.Request(rec.upstream + self.path, data=body, method=self.command)
                for k, v in self.headers.items():
                    if k.lower() not in ("host", "content-length", "connection", "accept-encoding"):
                        req.add_header(k, v)
                try:
                    resp = urllib.request.urlopen(req, timeout=RUN_TIMEOUT_S)
                except urllib.error.HTTPError as e:
                    resp = e
                with resp:
                    self.send_response(resp.status)
                    for k, v in resp.headers.items():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    kept = bytearray()
                    while chunk := resp.read1(65536):
                        if keep_answers:
                            kept += chunk
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    if keep_answers and self.command == "POST":
                        rec.answers.append({"path": self.path, "status": resp.status,
                                            "type": resp.headers.get("content-type", ""), "body": bytes(kept)})

            do_GET = do_POST = do_HEAD = _relay

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def streams(self) -> list[str]:
        """The text of every event stream answered to a POST to /v1/responses."""
        return [a["body"].decode() for a in self.answers
                if a["path"].endswith("/responses") and a["type"].startswith("text/event-stream")]

    def chats(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions") and r["body"]]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def codex_bin() -> str:
    try:
        return require_env("LLMCTL_CODEX_BIN")["LLMCTL_CODEX_BIN"]
    except StackError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def routes(stack):
    """role -> (URL Codex uses, recorder of the upstream's requests, llama URL): per llama-server one serve-proxy
    with a recorder on each side (`front`, keeping what Codex read), shared by the tests."""
    made: dict[str, tuple[str, Recorder, str]] = {}
    fronts: list[Recorder] = []

    def get(role: str) -> tuple[str, Recorder, str]:
        if role not in made:
            try:
                llama = stack.llama(role)
                rec = Recorder(llama)
                front = Recorder(stack.proxy(rec.url, KEY), keep_answers=True)
                fronts.append(front)
                made[role] = (front.url, rec, llama)
            except StackError as e:
                pytest.fail(str(e), pytrace=False)
        return made[role]

    yield get
    streams = [s for f in fronts for s in f.streams()]
    for _, rec, _ in made.values():
        rec.close()
    for f in fronts:
        f.close()
    # Every stream Codex read in this session follows the grammar (checked once all tests ran; a test that made
    # a broken stream fails this fixture's teardown with the rule it broke).
    for n, text in enumerate(streams):
        try:
            validate(text.splitlines())
        except AssertionError as e:
            pytest.fail(f"stream {n + 1} of {len(streams)} that Codex read breaks the Responses grammar: {e}",
                        pytrace=False)
    print(f"{len(streams)} /v1/responses streams that Codex read follow the Responses grammar")


def configure(home: Path, proxy: str, llama: str) -> str:
    """`llmctl client-config codex --write` into a fresh CODEX_HOME; returns the config it wrote."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CODEX_HOME": str(home), "HOME": str(home)}
    p = subprocess.run([str(llmctl_bin()), "client-config", "codex", "--proxy-url", proxy, "--llama-url", llama,
                        "--api-key-env", KEY_ENV, "--model", "local-model", "--write"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"client-config codex failed: {p.stderr}"
    return (home / "config.toml").read_text()


def run_codex(codex_bin: str, home: Path, work: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update({"HOME": str(home), "CODEX_HOME": str(home), KEY_ENV: KEY, "NO_COLOR": "1"})
    last = work.parent / f"{work.name}-last.txt"
    cmd = [codex_bin, "exec", "--strict-config", "--skip-git-repo-check", "--json", "-o", str(last),
           "-c", "model_providers.llmctl.stream_max_retries=0", "-c", "model_providers.llmctl.request_max_retries=0",
           *args]
    try:
        p = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"codex exec did not finish within {RUN_TIMEOUT_S}s; stderr {e.stderr!r:.2000}", pytrace=False)
    events = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return p, events


def items(events: list[dict], kind: str) -> list[dict]:
    return [e["item"] for e in events if e.get("type") == "item.completed" and e.get("item", {}).get("type") == kind]
