"""The real Claude Code binary ($LLMCTL_CLAUDE_BIN) through the target to a real llama-server.

Claude Code runs offline: telemetry and non-essential traffic off, a fresh HOME, the key from ANTHROPIC_API_KEY.
Its first request is large (system prompt, agent list, tools), and CPU prefill takes minutes, hence the long
timeouts; the llama-servers are shared across these tests so later requests hit llama.cpp's prompt cache.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from stack import StackError, require_env

RUN_TIMEOUT_S = 900  # one Claude Code run: ~20k-token CPU prefill on 2 shared cores, plus generation
MAX_OUTPUT_TOKENS = 256  # the tool round trip's model turns are ~65 tokens; a greeting fewer


@pytest.fixture(scope="session")
def claude_bin() -> str:
    try:
        return require_env("LLMCTL_CLAUDE_BIN")["LLMCTL_CLAUDE_BIN"]
    except StackError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def cc_dir(tmp_path_factory) -> Path:
    """One HOME and working directory for the Claude Code runs that share a llama-server: Claude Code writes the
    working directory into its system prompt, so a different one would change the prompt prefix."""
    return tmp_path_factory.mktemp("claude-code")


def run_claude(claude_bin: str, target, role: str, tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    try:
        url, key = target.endpoint(role)
    except StackError as e:
        pytest.fail(str(e), pytrace=False)
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    work = tmp / "proj"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update({
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": key or "no-key-needed",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        # The small test model can loop until max_tokens (32k at a few dozen tokens/s); bound the answers. Claude
        # Code continues a turn cut at the bound up to three times, so a rambling answer costs 4x this.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
    })
    try:
        return subprocess.run([claude_bin, *args], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"claude {' '.join(args)} did not finish within {RUN_TIMEOUT_S}s; stderr: {e.stderr!r:.2000}",
                    pytrace=False)


def ndjson(out: str) -> list[dict]:
    lines = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def result_of(lines: list[dict]) -> dict:
    results = [entry for entry in lines if entry.get("type") == "result"]
    assert results, f"no result line in Claude Code's stream-json output: {[entry.get('type') for entry in lines]}"
    return results[-1]


def test_print_mode_says_something(claude_bin, target, cc_dir):
    # A run in which the 135M model rambles past the output bound ends with Claude Code's own "exceeded the ...
    # output token maximum" (see test_second_prompt_reuses_prefix_cache): another greeting, at most three.
    for prompt in ("Say hello", "Say hi", "Say hey"):
        p = run_claude(claude_bin, target, "claude", cc_dir, ["-p", prompt])
        if p.returncode != 0 and "output token maximum" in p.stdout:
            print(f"{prompt!r}: the model rambled past {MAX_OUTPUT_TOKENS} output tokens; another prompt")
            continue
        assert p.returncode == 0, f"claude -p exited {p.returncode}; stdout {p.stdout[-1500:]!r}; stderr {p.stderr[-1500:]!r}"
        assert p.stdout.strip(), f"claude -p printed nothing; stderr {p.stderr[-1500:]!r}"
        print(f"claude -p {prompt!r} printed: {p.stdout.strip()[:300]!r}")
        return
    pytest.fail("the model rambled past the output bound on all three greetings")


def test_second_prompt_reuses_prefix_cache(claude_bin, target, cc_dir):
    # Two prompts in the same mode and directory: a different prompt changes Claude Code's
    # x-anthropic-billing-header system line (its hash suffix varies by prompt), the very first line of the prompt.
    # If it reached the model unchanged, llama.cpp could reuse almost nothing of the previous run.
    #
    # What is measured is the prompt cache, not the answer. The 135M model sometimes rambles past the output bound,
    # and Claude Code then continues the turn and finally exits 1 with its own max_output_tokens error: the proxy
    # reported stop_reason max_tokens, as it should. Such a run's usage includes the continuations, which read the
    # cache of their own turn, so it cannot show reuse across prompts: the second prompt is tried again with
    # other words (at most three), and only a run that ended by itself is measured. Any other error fails.
    def run(prompt: str) -> tuple[dict, bool]:
        p = run_claude(claude_bin, target, "claude", cc_dir, ["-p", prompt, "--output-format", "stream-json", "--verbose"])
        res = result_of(ndjson(p.stdout))
        rambled = bool(res.get("is_error")) and res.get("api_error") == "max_output_tokens"
        assert p.returncode == 0 or rambled, f"claude exited {p.returncode}; stderr {p.stderr[-1500:]!r}; result {res}"
        assert rambled or (res.get("subtype") == "success" and not res.get("is_error")), res
        assert res.get("api_error_status") is None and res.get("usage"), res
        return res["usage"], rambled

    usages = [run("Say goodbye")[0]]
    for prompt in ("Say thanks", "Say yes", "Say ok"):
        usage, rambled = run(prompt)
        if not rambled:
            usages.append(usage)
            break
        print(f"{prompt!r}: the model rambled past {MAX_OUTPUT_TOKENS} output tokens; another prompt")
    assert len(usages) == 2, "the model rambled past the output bound on all three second prompts"
    usage = usages[-1]
    cached = usage.get("cache_read_input_tokens") or 0
    total = cached + (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0)
    print(f"Claude Code prompt after a different one: {cached} of {total} input tokens read from llama.cpp's "
          f"prompt cache (first: {usages[0]})")
    # Claude Code puts the user's text before its agent/skill list, so two conversations share only what precedes
    # it: the system prompt (~1.5k tokens in 2.1.197), which starts with the billing line. Unstripped, that line
    # would leave ~0 tokens reusable.
    assert cached >= 1000, f"the system prompt was not reused from llama.cpp's cache: {cached} of {total} ({usage})"


def tool_example(path: str) -> str:
    """A system prompt holding two example exchanges in the Gemma 4 template's own syntax.

    A 135M model does not decide to use tools; what it does well is copy. After `<|turn>model` it copies what
    followed `<|turn>model` in the examples (a Read call, then `<|im_end|>`, SmolLM2's end-of-turn token, which
    llama-server parses as a special token in the prompt); after the real tool response it copies what followed
    `<tool_response|>` ("Done." and end of turn). The call itself is real: produced by the model, parsed by
    llama-server's Gemma 4 tool-call parser, translated by the proxy, run by Claude Code.

    Why two: Claude Code puts today's date in the user turn, and with one example the greedy first token flipped
    between `<|tool_call>` and `<|tool_response>` with the date and the path (19 of 40 dates called the tool, measured
    with llama-server's /completion on the rendered prompt); with the exchange twice, 40 of 40 did, and 20 of 20
    second turns began with "Done.".
    """
    one = (
        "<|turn>user\nRead the notes.<turn|>\n<|turn>model\n"
        f'<|tool_call>call:Read{{file_path:<|"|>{path}<|"|>}}<tool_call|><|im_end|>\n'
        '<|tool_response>response:Read{value:<|"|>the notes<|"|>}<tool_response|>Done.<|im_end|>'
    )
    return "Examples:\n" + "\n".join([one, one])


def test_tool_round_trip(claude_bin, target, tmp_path):
    # Only the Read tool is offered (--tools), on the Gemma-template llama-server (real tool-call parsing, greedy
    # decoding); see tool_example for how the prompt leads the tiny model to call it. A 135M model may still write
    # a made-up tool response instead of the call on some prompt (the date and path are part of it): up to three
    # runs, and the first that calls a tool must complete the whole round trip. A proxy that broke tool calls fails
    # all three; the message says what the model answered each time.
    answers = []
    for attempt in range(3):
        work = tmp_path / f"run{attempt}"
        (work / "proj").mkdir(parents=True, exist_ok=True)
        notes = work / "proj" / "notes.txt"
        notes.write_text("FIRST LINE: the quick brown fox\nsecond line\n")
        p = run_claude(claude_bin, target, "tools", work, [
            "-p", "Read the notes.", "--system-prompt", tool_example(str(notes)),
            "--tools", "Read", "--allowedTools", "Read", "--output-format", "stream-json", "--verbose",
        ])
        lines = ndjson(p.stdout)
        assert p.returncode == 0, f"claude exited {p.returncode}; stderr {p.stderr[-1500:]!r}; lines {lines[-2:]}"
        uses = [b for entry in lines if entry.get("type") == "assistant"
                for b in entry["message"].get("content", []) if b.get("type") == "tool_use"]
        results = [b for entry in lines if entry.get("type") == "user"
                   for b in (entry["message"].get("content") or [])
                   if isinstance(b, dict) and b.get("type") == "tool_result"]
        res = result_of(lines)
        print(f"tool round trip (run {attempt + 1}): tool_use {[(u['name'], u.get('input')) for u in uses]}; "
              f"tool_result is_error {[r.get('is_error', False) for r in results]}; num_turns "
              f"{res.get('num_turns')}; final text {res.get('result')!r:.200}; usage {res.get('usage')}")
        if not uses:
            answers.append(f"{res.get('result')!r:.300}")
            continue
        assert uses[0]["name"] == "Read" and isinstance(uses[0].get("input"), dict), uses[0]
        assert results and results[0].get("tool_use_id") == uses[0]["id"], f"no tool_result for {uses[0]['id']}: {results}"
        assert res.get("subtype") == "success" and not res.get("is_error"), res
        assert res.get("num_turns", 0) >= 2, f"no model turn after the tool result: {res}"
        return
    raise AssertionError(f"the model called no tool in 3 runs; it answered: {answers}")


def test_settings_written_by_client_config(target, stack, tmp_path):
    # The settings.json `llmctl client-config claude --write` makes from a file that held a stale ANTHROPIC_API_KEY
    # (which Claude Code would send instead, and the keyed proxy would answer 401) and an apiKeyHelper: both go.
    # The real Claude Code answering with such a file and nothing in its environment is provision_sim's last mile
    # (the_last_mile_claude_code_answers_on_a_laptop), against the provisioned proxy; not run twice.
    if target.name != "llmctl serve-proxy":
        pytest.skip("client-config points Claude Code at llmctl serve-proxy")
    url, key = target.endpoint("claude")
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    settings = home / ".claude" / "settings.json"
    settings.write_text(json.dumps({"apiKeyHelper": "/bin/false", "env": {"ANTHROPIC_API_KEY": "sk-stale"}}))
    from stack import llmctl_bin
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update({"HOME": str(home), "LLMCTL_E2E_PROXY_KEY": key})
    cfg = subprocess.run([str(llmctl_bin()), "client-config", "claude", "--proxy-url", url, "--llama-url",
                          stack.llama("claude"), "--api-key-env", "LLMCTL_E2E_PROXY_KEY", "--model", "local",
                          "--write"], env=env, capture_output=True, text=True, timeout=60)
    assert cfg.returncode == 0, cfg.stderr
    assert "removed env.ANTHROPIC_API_KEY" in cfg.stdout and "removed apiKeyHelper" in cfg.stdout, cfg.stdout
    written = json.loads(settings.read_text())["env"]
    assert written["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "32768", written  # the claude llama-server's slot
    assert "ANTHROPIC_API_KEY" not in written, written
