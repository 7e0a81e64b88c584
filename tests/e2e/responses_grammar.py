"""OpenAI's Responses streaming grammar, checked on the raw SSE wire (event names and sequence numbers included: the
SDK hides or tolerates both). Written from OpenAI's Responses streaming reference and what Codex's parser requires
(../../shared/reference/codex-traffic.md): every stream the e2e tests produce through /v1/responses goes through
`validate`, so a stream that the SDK or Codex happens to accept but that breaks the grammar still fails a test.

The rules:
- each SSE message has an `event:` name equal to its data's `type`, and a `sequence_number` counting 0, 1, 2, ...;
- `response.created` first, then `response.in_progress` (repeated as a keep-alive); exactly one terminal event (`response.completed`, `response.incomplete` or `response.failed`), last;
- items one at a time, `output_index` 0, 1, 2, ... in order: `output_item.added` ... `output_item.done`, every event
  in between naming that item's id and index;
- a message's text: `content_part.added`, `output_text.delta`*, `output_text.done` whose text is the deltas joined,
  `content_part.done` with the same text; a function call's arguments: `function_call_arguments.delta`*, `.done`
  with the deltas joined, valid JSON; a custom tool call's input: `custom_tool_call_input.delta`*, `.done`; a
  reasoning summary: `reasoning_summary_part.added`, `reasoning_summary_text.delta`*, `.done`, `_part.done`;
- the item in `output_item.done` agrees with what was streamed, and the terminal response's `output` is exactly
  the items done, in order; its `usage` adds up (`total_tokens`), `cached_tokens` within `input_tokens`;
- `response.incomplete` says why (`incomplete_details.reason`); `response.failed` carries `error.code`/`message`;
- one response id throughout.
"""

from __future__ import annotations

import json
from typing import Iterable

from grammar import parse_sse

TERMINAL = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}
ITEM_TYPES = {"message", "function_call", "custom_tool_call", "reasoning"}


class _Item:
    def __init__(self, index: int, item: dict) -> None:
        self.index = index
        self.id = item.get("id")
        self.type = item.get("type")
        self.added = item
        self.parts: dict[int, str] = {}  # content_index -> text (message) or summary_index -> text (reasoning)
        self.parts_done: dict[int, str] = {}
        self.text_done: dict[int, str] = {}
        self.args = ""
        self.args_done: str | None = None


def validate(lines: Iterable[str]) -> dict:
    """Checks one /v1/responses stream (its lines); returns a summary: `status`, `items` (the done items), `usage`,
    `events` (the names in order), `error`. Raises AssertionError naming the first rule broken."""
    events = list(parse_sse(lines))
    assert events, "empty stream"
    names: list[str] = []
    seq = 0
    response_id = None
    terminal = None
    open_item: _Item | None = None
    done_items: list[dict] = []
    for n, (name, data) in enumerate(events):
        where = f"event {n} ({name})"
        assert terminal is None, f"{where} after the terminal {terminal[0]}"
        assert name, f"{where}: no `event:` line (data {data[:120]!r})"
        try:
            d = json.loads(data)
        except ValueError as e:
            raise AssertionError(f"{where}: data is not JSON: {e}: {data[:200]!r}") from None
        assert isinstance(d, dict), f"{where}: data is not an object"
        assert d.get("type") == name, f"{where}: data type {d.get('type')!r} differs from the event name"
        assert d.get("sequence_number") == seq, f"{where}: sequence_number {d.get('sequence_number')!r}, want {seq}"
        seq += 1
        names.append(name)

        if n == 0:
            assert name == "response.created", f"the stream starts with {name}, not response.created"
        if "response" in d and name.startswith("response.") and name.count(".") == 1:
            r = d["response"]
            assert isinstance(r, dict) and r.get("object") == "response", f"{where}: response object {r!r:.200}"
            response_id = response_id or r.get("id")
            assert r.get("id") == response_id and response_id, f"{where}: response id {r.get('id')!r} != {response_id!r}"
        if name in ("response.created", "response.in_progress"):
            assert d["response"].get("status") in ("in_progress", "queued"), f"{where}: status {d['response'].get('status')}"
            # A repeated in_progress is the keep-alive (Codex's idle timer counts events, not SSE comments).
            assert name != "response.created" or n == 0, f"{where}: a second response.created"
            continue
        if name in TERMINAL:
            r = d["response"]
            assert r.get("status") == TERMINAL[name], f"{where}: status {r.get('status')!r}"
            if name != "response.failed":
                assert open_item is None, f"{where}: item {open_item.index} ({open_item.type}) was never done"
            output = r.get("output")
            assert isinstance(output, list), f"{where}: output {output!r:.200}"
            assert [o.get("id") for o in output] == [i.get("id") for i in done_items], (
                f"{where}: output ids {[o.get('id') for o in output]} != the items done {[i.get('id') for i in done_items]}")
            for o, i in zip(output, done_items):
                assert o == i, f"{where}: output item {o.get('id')} differs from its output_item.done: {o!r:.300} vs {i!r:.300}"
            usage = r.get("usage")
            if name == "response.failed":
                err = r.get("error")
                assert isinstance(err, dict) and err.get("code") and err.get("message"), f"{where}: error {err!r}"
            else:
                assert isinstance(usage, dict), f"{where}: no usage"
                for k in ("input_tokens", "output_tokens", "total_tokens"):
                    assert isinstance(usage.get(k), int) and usage[k] >= 0, f"{where}: usage.{k} = {usage.get(k)!r}"
                assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], (
                    f"{where}: usage does not add up: {usage}")
                cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
                assert isinstance(cached, int) and 0 <= cached <= usage["input_tokens"], f"{where}: cached {cached!r}"
            if name == "response.incomplete":
                reason = (r.get("incomplete_details") or {}).get("reason")
                assert reason in ("max_output_tokens", "content_filter"), f"{where}: incomplete_details {r.get('incomplete_details')!r}"
            terminal = (name, r)
            continue

        # Item events.
        if name == "response.output_item.added":
            assert open_item is None, f"{where}: item {open_item.index} is still open"
            assert d.get("output_index") == len(done_items), f"{where}: output_index {d.get('output_index')}, want {len(done_items)}"
            item = d.get("item") or {}
            assert item.get("type") in ITEM_TYPES, f"{where}: item type {item.get('type')!r}"
            assert item.get("id") and item.get("status") == "in_progress", f"{where}: item {item!r:.200}"
            open_item = _Item(d["output_index"], item)
            continue
        assert open_item is not None, f"{where}: no item is open"
        assert d.get("output_index") == open_item.index, f"{where}: output_index {d.get('output_index')} != {open_item.index}"
        assert d.get("item_id", open_item.id) == open_item.id, f"{where}: item_id {d.get('item_id')!r} != {open_item.id!r}"
        it = open_item
        if name == "response.output_item.done":
            item = d.get("item") or {}
            assert item.get("id") == it.id and item.get("type") == it.type, f"{where}: item {item!r:.200}"
            assert item.get("status") == "completed", f"{where}: status {item.get('status')!r}"
            if it.type == "message":
                assert set(it.parts) == set(it.parts_done), f"{where}: parts added {sorted(it.parts)} but done {sorted(it.parts_done)}"
                texts = [c.get("text") for c in item.get("content", [])]
                assert texts == [it.parts_done[k] for k in sorted(it.parts_done)], f"{where}: content {texts} vs streamed"
                assert item.get("role") == "assistant", f"{where}: role {item.get('role')!r}"
            elif it.type == "function_call":
                assert it.args_done is not None, f"{where}: no function_call_arguments.done"
                assert item.get("arguments") == it.args_done, f"{where}: arguments differ from the streamed ones"
                assert item.get("call_id") and item.get("name"), f"{where}: call_id/name missing: {item!r:.200}"
                json.loads(it.args_done)  # a completed call's arguments are JSON
            elif it.type == "custom_tool_call":
                assert it.args_done is not None, f"{where}: no custom_tool_call_input.done"
                assert item.get("input") == it.args_done, f"{where}: input differs from the streamed one"
                assert item.get("call_id") and item.get("name"), f"{where}: call_id/name missing: {item!r:.200}"
            elif it.type == "reasoning":
                summary = [s.get("text") for s in item.get("summary", [])]
                assert summary == [it.parts_done[k] for k in sorted(it.parts_done)], f"{where}: summary {summary}"
            done_items.append(item)
            open_item = None
            continue
        if name in ("response.content_part.added", "response.reasoning_summary_part.added"):
            key = "content_index" if "content" in name else "summary_index"
            want = "message" if "content" in name else "reasoning"
            assert it.type == want, f"{where}: in a {it.type} item"
            k = d.get(key)
            assert k == len(it.parts), f"{where}: {key} {k}, want {len(it.parts)}"
            it.parts[k] = ""
        elif name in ("response.output_text.delta", "response.reasoning_summary_text.delta"):
            key = "content_index" if "output_text" in name else "summary_index"
            k = d.get(key)
            assert k in it.parts and k not in it.text_done, f"{where}: {key} {k} is not an open part"
            assert isinstance(d.get("delta"), str), f"{where}: delta {d.get('delta')!r}"
            it.parts[k] += d["delta"]
        elif name in ("response.output_text.done", "response.reasoning_summary_text.done"):
            key = "content_index" if "output_text" in name else "summary_index"
            k = d.get(key)
            assert k in it.parts and k not in it.text_done, f"{where}: {key} {k} is not an open part"
            assert d.get("text") == it.parts[k], f"{where}: text {d.get('text')!r:.100} is not the deltas joined {it.parts[k]!r:.100}"
            it.text_done[k] = d["text"]
        elif name in ("response.content_part.done", "response.reasoning_summary_part.done"):
            key = "content_index" if "content" in name else "summary_index"
            k = d.get(key)
            assert k in it.text_done, f"{where}: part {k} done before its text"
            assert (d.get("part") or {}).get("text") == it.text_done[k], f"{where}: part text differs"
            it.parts_done[k] = it.text_done[k]
        elif name in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
            want = "function_call" if "function" in name else "custom_tool_call"
            assert it.type == want and it.args_done is None, f"{where}: in a {it.type} item (done: {it.args_done is not None})"
            assert isinstance(d.get("delta"), str), f"{where}: delta {d.get('delta')!r}"
            it.args += d["delta"]
        elif name in ("response.function_call_arguments.done", "response.custom_tool_call_input.done"):
            field = "arguments" if "function" in name else "input"
            assert it.args_done is None, f"{where}: a second .done"
            assert d.get(field) == it.args, f"{where}: {field} {d.get(field)!r:.100} is not the deltas joined {it.args!r:.100}"
            it.args_done = it.args
        else:
            raise AssertionError(f"{where}: not an event of the Responses grammar")
    assert terminal is not None, f"the stream ended without a terminal event; last: {names[-3:]}"
    r = terminal[1]
    return {"status": r.get("status"), "items": done_items, "usage": r.get("usage"), "events": names,
            "error": r.get("error"), "response": r}
