"""Anthropic's streaming event grammar, checked on the raw SSE wire (event names included, pings included: the SDK
hides both). Written from the Messages API streaming documentation and Claude Code's parser behaviour, see
../../shared/reference/anthropic-proxy-landscape.md section B/C."""

from __future__ import annotations

import json
from typing import Iterable, Iterator

DELTA_FOR_BLOCK = {
    "text": {"text_delta"},
    "tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "redacted_thinking": set(),
}
STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"}


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str | None, str]]:
    """(event name, data) per SSE message; comments (`: keep-alive`) are skipped."""
    event, data = None, []
    for line in lines:
        line = line.rstrip("\r")
        if line == "":
            if event is not None or data:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if event is not None or data:
        yield event, "\n".join(data)


def decode(raw: list[tuple[str | None, str]]) -> list[dict]:
    events = []
    for name, data in raw:
        try:
            payload = json.loads(data)
        except ValueError:
            raise AssertionError(f"event {name!r} carries data that is not JSON: {data[:200]!r}")
        if not isinstance(payload, dict) or "type" not in payload:
            raise AssertionError(f"event {name!r} data has no `type`: {data[:200]!r}")
        if name != payload["type"]:
            raise AssertionError(f"SSE `event: {name}` does not match data type {payload['type']!r}")
        events.append(payload)
    return events


def validate(events: list[dict], require_ping: bool = True) -> dict:
    """Raises AssertionError naming the first violation; returns a summary (text, blocks, stop_reason, usage)."""
    assert events, "empty stream"
    types = [e["type"] for e in events]
    assert types[0] == "message_start", f"first event is {types[0]!r}, not message_start: {types[:5]}"
    assert types[-1] == "message_stop", f"last event is {types[-1]!r}, not message_stop (nothing may follow it): {types[-5:]}"
    assert types.count("message_start") == 1, f"{types.count('message_start')} message_start events"
    assert types.count("message_stop") == 1, f"{types.count('message_stop')} message_stop events"
    assert types.count("message_delta") == 1, f"{types.count('message_delta')} message_delta events, want exactly 1"
    assert "error" not in types, f"error event in stream: {[e for e in events if e['type'] == 'error']}"
    if require_ping:
        assert "ping" in types, f"no ping event: {types[:8]}"

    msg = events[0]["message"]
    assert msg.get("type") == "message" and msg.get("role") == "assistant", f"bad message_start message: {msg}"
    assert msg.get("content") == [], f"message_start content must be empty, got {msg.get('content')}"
    assert isinstance(msg.get("usage", {}).get("input_tokens"), int), f"message_start without usage.input_tokens: {msg}"

    open_index: int | None = None
    open_type: str | None = None
    next_index = 0
    blocks: list[dict] = []
    texts: dict[int, str] = {}
    delta_seen = False
    summary: dict = {"message_start": msg}
    for i, e in enumerate(events[1:-1], start=1):
        t = e["type"]
        assert t != "message_start", "second message_start"
        if delta_seen:
            assert t == "ping", f"{t} after message_delta (only message_stop may follow)"
        if t == "ping":
            continue
        if t == "content_block_start":
            assert open_index is None, f"event {i}: block {e.get('index')} started while block {open_index} is open"
            assert e.get("index") == next_index, f"event {i}: block index {e.get('index')}, expected {next_index} (dense, in order)"
            block = e["content_block"]
            assert block.get("type") in DELTA_FOR_BLOCK, f"event {i}: unknown block type {block.get('type')!r}"
            if block["type"] == "tool_use":
                assert block.get("id") and block.get("name"), f"event {i}: tool_use block without id/name: {block}"
                assert block.get("input") == {}, f"event {i}: tool_use must start with input {{}}, got {block.get('input')}"
            open_index, open_type = next_index, block["type"]
            blocks.append(dict(block))
            texts[open_index] = ""
            next_index += 1
        elif t == "content_block_delta":
            assert open_index is not None, f"event {i}: delta with no open block"
            assert e.get("index") == open_index, f"event {i}: delta for index {e.get('index')}, open block is {open_index}"
            dt = e["delta"].get("type")
            assert dt in DELTA_FOR_BLOCK[open_type], f"event {i}: {dt} inside a {open_type} block"
            piece = e["delta"].get({"text_delta": "text", "input_json_delta": "partial_json",
                                    "thinking_delta": "thinking", "signature_delta": "signature"}[dt])
            assert isinstance(piece, str), f"event {i}: {dt} without its string field: {e['delta']}"
            if dt != "signature_delta":
                texts[open_index] += piece
        elif t == "content_block_stop":
            assert open_index is not None and e.get("index") == open_index, \
                f"event {i}: stop for index {e.get('index')}, open block is {open_index}"
            open_index = open_type = None
        elif t == "message_delta":
            assert open_index is None, f"event {i}: message_delta while block {open_index} is still open"
            reason = e["delta"].get("stop_reason")
            assert reason in STOP_REASONS, f"event {i}: stop_reason {reason!r}"
            assert isinstance(e.get("usage", {}).get("output_tokens"), int), f"event {i}: message_delta without usage.output_tokens"
            summary["stop_reason"] = reason
            summary["stop_sequence"] = e["delta"].get("stop_sequence")
            summary["usage"] = e["usage"]
            delta_seen = True
        else:
            raise AssertionError(f"event {i}: unexpected event type {t!r}")
    assert delta_seen, "no message_delta"
    for idx, block in enumerate(blocks):
        if block["type"] == "tool_use":
            raw = texts[idx]
            try:
                block["input"] = json.loads(raw) if raw else {}
            except ValueError:
                # Cut off by max_tokens, the last tool call's arguments are legitimately unfinished.
                if not (summary["stop_reason"] == "max_tokens" and idx == len(blocks) - 1):
                    raise AssertionError(f"tool_use block {idx}: input_json_delta pieces do not form JSON: {raw[:200]!r}")
                block["input"] = None
        elif block["type"] == "text":
            block["text"] = block.get("text", "") + texts[idx]
    summary["blocks"] = blocks
    summary["text"] = "".join(b.get("text", "") for b in blocks if b["type"] == "text")
    summary["types"] = types
    return summary
