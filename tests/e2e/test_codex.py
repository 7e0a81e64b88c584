"""The real Codex CLI ($LLMCTL_CODEX_BIN) through `llmctl serve-proxy`'s /v1/responses to a real llama-server.

Codex runs offline with a fresh CODEX_HOME whose config.toml is written by `llmctl client-config codex` (the context
window read from llama-server's /props), in `codex exec` mode. Between serve-proxy and llama-server sits a recording
pass-through (`Recorder`, codex_stack.py): every chat request the upstream received is kept, so the tests assert on
what actually reached the model, not on what Codex says it sent. A second one sits between
Codex and serve-proxy and keeps every /v1/responses stream Codex read: each is checked against the Responses event
grammar (responses_grammar.py).

Codex's first request is ~5-10k tokens (instructions and tools); CPU prefill takes a minute or more on 2 shared cores.
The tool round trips (exec_command, an edit under workspace-write) are in codex_tools.py, run by hand: why there.
"""

from __future__ import annotations

from codex_stack import KEY_ENV, codex_bin, configure, items, routes, run_codex  # noqa: F401 - fixtures by name


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
