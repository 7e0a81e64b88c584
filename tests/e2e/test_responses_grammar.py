"""The Responses grammar checker itself (responses_grammar.py) on hand-made streams, no servers: a well-formed stream
passes, and each broken one fails on the rule it breaks. The e2e suites lean on `validate`; this shows it can fail."""

from __future__ import annotations

import copy
import json

import pytest

from responses_grammar import validate


def response(status: str, output: list | None = None, **extra) -> dict:
    r = {"id": "resp_1", "object": "response", "status": status, "output": output or []}
    if status in ("completed", "incomplete"):
        r["usage"] = {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
                      "input_tokens_details": {"cached_tokens": 4}}
    return r | extra


MSG_DONE = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi there", "annotations": []}]}
FC_DONE = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "f",
           "arguments": '{"a":1}'}


def good() -> list[dict]:
    return [
        {"type": "response.created", "response": response("in_progress")},
        {"type": "response.in_progress", "response": response("in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}},
        {"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": ""}},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi"},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "delta": " there"},
        {"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "text": "Hi there"},
        {"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": "Hi there"}},
        {"type": "response.output_item.done", "output_index": 0, "item": MSG_DONE},
        {"type": "response.output_item.added", "output_index": 1,
         "item": {"id": "fc_1", "type": "function_call", "status": "in_progress", "call_id": "call_1", "name": "f",
                  "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1, "delta": '{"a":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1, "delta": "1}"},
        {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 1,
         "arguments": '{"a":1}'},
        {"type": "response.output_item.done", "output_index": 1, "item": FC_DONE},
        {"type": "response.completed", "response": response("completed", [MSG_DONE, FC_DONE])},
    ]


def wire(events: list[dict], names: list[str] | None = None) -> list[str]:
    lines = []
    for n, e in enumerate(events):
        e = {"sequence_number": n, **e}
        lines += [f"event: {names[n] if names else e['type']}", f"data: {json.dumps(e)}", ""]
    return lines


def test_a_well_formed_stream_passes():
    s = validate(wire(good()))
    assert s["status"] == "completed" and [i["type"] for i in s["items"]] == ["message", "function_call"]


def broken(edit) -> list[dict]:
    ev = copy.deepcopy(good())
    edit(ev)
    return ev


@pytest.mark.parametrize("events, rule", [
    (broken(lambda ev: ev.pop(0)), "starts with"),
    (broken(lambda ev: ev.pop()), "without a terminal event"),
    (broken(lambda ev: ev.append({"type": "response.in_progress", "response": response("in_progress")})),
     "after the terminal"),
    (broken(lambda ev: ev[5].update(delta=" thereX")), "not the deltas joined"),
    (broken(lambda ev: ev[12].update(arguments='{"a":2}')), "not the deltas joined"),
    (broken(lambda ev: ev[9].update(output_index=2)), "output_index"),
    (broken(lambda ev: ev[4].update(item_id="msg_other")), "item_id"),
    (broken(lambda ev: ev.pop(8)), "still open"),
    (broken(lambda ev: ev[-1]["response"]["output"].pop()), "output ids"),
    (broken(lambda ev: ev[-1]["response"]["usage"].update(total_tokens=99)), "usage"),
    (broken(lambda ev: ev[-1]["response"].update(id="resp_2")), "response id"),
    (broken(lambda ev: ev.insert(2, {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                                     "content_index": 0, "delta": "x"})), "no item is open"),
], ids=["no created", "no terminal", "event after terminal", "text", "arguments", "index", "item id",
        "item never done", "output", "usage", "response id", "delta outside an item"])
def test_a_broken_stream_fails_on_its_rule(events, rule):
    with pytest.raises(AssertionError, match=rule):
        validate(wire(events))


def test_names_and_sequence_numbers_are_checked():
    ev = good()
    names = [e["type"] for e in ev]
    names[3] = "response.output_text.delta"
    with pytest.raises(AssertionError, match="differs from the event name"):
        validate(wire(ev, names))
    lines = wire(ev)
    lines[1] = lines[1].replace('"sequence_number": 0', '"sequence_number": 1')
    with pytest.raises(AssertionError, match="sequence_number"):
        validate(lines)
