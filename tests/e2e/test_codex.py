"""The real Codex CLI ($LLMCTL_CODEX_BIN) through `llmctl serve-proxy`'s /v1/responses to a real llama-server.

Codex runs offline with a fresh CODEX_HOME whose config.toml is written by `llmctl client-config codex` (the context
window read from llama-server's /props), in `codex exec` mode. Between serve-proxy and llama-server sits a recording
pass-through (`Recorder`): every chat request the upstream received is kept, so the tests assert on what actually
reached the model (the tool output on the second turn), not on what Codex says it sent. A second one sits between
Codex and serve-proxy and keeps every /v1/responses stream Codex read: each is checked against the Responses event
grammar (responses_grammar.py).

Codex's first request is ~10k tokens (instructions and tools); CPU prefill takes a minute or more on 2 shared cores.
"""

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


def test_client_config_and_plain_prompt(codex_bin, routes, tmp_path):
    proxy, rec, llama = routes("claude")
    home = tmp_path / "codex-home"
    config = configure(home, proxy, llama)
    # The window is what llama-server serves per slot (-c 32768 -np 1), not Codex's 272k fallback.
    assert "model_context_window = 32768" in config, config
    assert 'wire_api = "responses"' in config and f'env_key = "{KEY_ENV}"' in config, config
    before = len(rec.chats())
    p, events = run_codex(codex_bin, home, tmp_path / "proj", ["Say hello"])
    assert p.returncode == 0, f"codex exec exited {p.returncode}; stdout {p.stdout[-1500:]!r}; stderr {p.stderr[-1500:]!r}"
    messages = items(events, "agent_message")
    print(f"codex exec 'Say hello' answered: {[m.get('text', '')[:200] for m in messages]}; "
          f"turn usage {[e.get('usage') for e in events if e.get('type') == 'turn.completed']}")
    assert messages and any(m.get("text", "").strip() for m in messages), f"no answer: {events[-3:]}"
    chats = rec.chats()[before:]
    assert chats, "llama-server received no chat request"
    # Codex's developer messages arrive as the system prompt, its tools as functions.
    first = chats[0]
    assert first["messages"][0]["role"] == "system", first["messages"][0]
    names = [t["function"]["name"] for t in first.get("tools", [])]
    assert "exec_command" in names, names


def exec_example(cmd: str) -> str:
    """Two example exchanges in the Gemma 4 template's own syntax, given to Codex as developer_instructions.

    As in test_claude_code.tool_example: the 135M model does not decide to use a tool, it copies. After
    `<|turn>model` it copies the call that followed it in the examples (then `<|im_end|>`, SmolLM2's end-of-turn
    token); after the real tool response, what followed `<tool_response|>`. The call is real: generated by the
    model, parsed by llama-server's Gemma 4 tool-call parser, translated by serve-proxy into a Responses
    function_call, and run by Codex.
    """
    # The template writes string arguments raw between <|"|> quotes (newlines included).
    one = (
        "<|turn>user\nDo the task.<turn|>\n<|turn>model\n"
        f'<|tool_call>call:exec_command{{cmd:<|"|>{cmd}<|"|>}}<tool_call|><|im_end|>\n'
        '<|tool_response>response:exec_command{value:<|"|>ok<|"|>}<tool_response|>Done.<|im_end|>'
    )
    return "Examples:\n" + "\n".join([one, one])


NOTES = "FIRST LINE: the quick brown fox\n"


def run_tool_task(codex_bin, routes, tmp_path, cmd: str, extra: list[str]):
    """Up to three runs (the date and paths are part of the prompt, and a 135M model may answer in text on some
    prompt); returns the first run in which the model called exec_command, with the chat requests it caused."""
    proxy, rec, llama = routes("tools")
    answers = []
    for attempt in range(3):
        home = tmp_path / f"home{attempt}"
        configure(home, proxy, llama)
        work = tmp_path / f"run{attempt}"
        work.mkdir(parents=True, exist_ok=True)
        (work / "notes.txt").write_text(NOTES)
        before = len(rec.chats())
        # The examples go in twice: as developer_instructions (Codex puts them in its second developer message,
        # far from the end of a ~7k-token prompt) and right before the task in the prompt itself. Measured on
        # the Codex 0.171.0 prompt rendered by this llama-server: with the system copy alone the model wrote a
        # made-up <|tool_response>; with both it called exec_command with the exact command, the patch included,
        # and after the real output answered in text.
        example = exec_example(cmd)
        p, events = run_codex(codex_bin, home, work, [
            "-c", f"developer_instructions={json.dumps(example)}", *extra, f"{example}\n\nDo the task.",
        ])
        chats = rec.chats()[before:]
        # A command Codex ran, or a patch it took from exec_command and applied itself.
        calls = items(events, "command_execution") + items(events, "file_change")
        print(f"run {attempt + 1}: rc {p.returncode}; tool items {[(c.get('type'), c.get('command') or c.get('changes'), c.get('exit_code')) for c in calls]}; "
              f"messages {[m.get('text', '')[:100] for m in items(events, 'agent_message')]}; {len(chats)} upstream requests")
        if not calls:
            answers.append((p.returncode, [m.get("text", "")[:200] for m in items(events, "agent_message")],
                            p.stderr[-300:]))
            continue
        return p, events, chats, work
    raise AssertionError(f"the model called no tool in 3 runs; it answered: {answers}")


def test_exec_command_round_trip(codex_bin, routes, tmp_path):
    p, events, chats, work = run_tool_task(codex_bin, routes, tmp_path, "cat notes.txt", [])
    assert p.returncode == 0, f"codex exec exited {p.returncode}; stderr {p.stderr[-1500:]!r}"
    # The run's first request offered exec_command and the model's call came back from the upstream; Codex ran it
    # and sent a second request: what llama-server received then carries the call and the command's output.
    assert len(chats) >= 2, f"no second request after the tool call: {len(chats)}"
    second = chats[1]["messages"]
    calls = [c for m in second if m.get("role") == "assistant" for c in (m.get("tool_calls") or [])]
    assert calls and calls[-1]["function"]["name"] == "exec_command", second[-3:]
    assert json.loads(calls[-1]["function"]["arguments"]).get("cmd") == "cat notes.txt", calls[-1]
    tool_msgs = [m for m in second if m.get("role") == "tool"]
    assert tool_msgs and tool_msgs[-1]["tool_call_id"] == calls[-1]["id"], second[-3:]
    # Codex's real output of the command: its exit line and the file's text.
    out = tool_msgs[-1]["content"]
    out = out if isinstance(out, str) else json.dumps(out)
    assert NOTES.strip() in out and "exited with code 0" in out, out[:500]
    assert items(events, "agent_message"), f"no answer after the tool result: {events[-3:]}"


PATCH = "apply_patch <<'EOF'\n*** Begin Patch\n*** Add File: hello.txt\n+hello from codex\n*** End Patch\nEOF"


def test_edit_lands_in_a_file_with_workspace_write(codex_bin, routes, tmp_path):
    # With a model Codex has no metadata for, 0.171.0 offers no apply_patch tool: the model types the patch into
    # exec_command, and Codex intercepts and applies it itself.
    p, events, chats, work = run_tool_task(codex_bin, routes, tmp_path, PATCH, ["-s", "workspace-write"])
    assert p.returncode == 0, f"codex exec exited {p.returncode}; stderr {p.stderr[-1500:]!r}"
    first = chats[0]
    assert "apply_patch" not in [t["function"]["name"] for t in first.get("tools", [])]
    target = work / "hello.txt"
    assert target.is_file(), f"no hello.txt in {work}: {sorted(x.name for x in work.iterdir())}; events {events[-4:]}"
    assert target.read_text() == "hello from codex\n", target.read_text()
