"""The official OpenAI Python SDK against `llmctl serve-proxy`'s /v1/responses (the protocol of Codex CLI), on the
same real llama-servers as the Anthropic SDK suite: `responses.create` and `responses.stream`, text, function and
custom (freeform) tools, a tool round trip, `max_output_tokens`, structured output, errors in OpenAI's shape,
`GET /v1/models` in OpenAI's shape, and a client that leaves mid-stream. Every stream is also read raw and checked
against the Responses event grammar (responses_grammar.py), which the SDK does not enforce.

The 135M test model writes random-ish text: the checks assert on protocol and structure, and on content only where
the protocol guarantees it (a forced tool's name, JSON arguments under a grammar).
"""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from checks import poll, slots_busy
from responses_grammar import validate
from stack import StackError, http_json

KEY = "e2e-openai-key"
MODEL = "gpt-5.1-codex"  # a client model name that is not the upstream's: the response must echo it
TIMEOUT = 600
WEATHER_TOOL = {
    "type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
    "strict": True,
}
PATCH_TOOL = {
    "type": "custom", "name": "apply_patch",
    "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool, so do not wrap the patch in JSON.",
}
WEATHER_Q = "What is the weather in Paris right now?"


@pytest.fixture(scope="module")
def urls(stack):
    """role -> (proxy URL, llama URL), started on first use."""
    made: dict[str, tuple[str, str]] = {}

    def get(role: str) -> tuple[str, str]:
        if role not in made:
            try:
                llama = stack.llama(role)
                made[role] = (stack.proxy(llama, KEY), llama)
            except StackError as e:
                pytest.fail(str(e), pytrace=False)
        return made[role]

    return get


def sdk(urls, role: str = "text", key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=urls(role)[0] + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def raw_stream(urls, role: str, body: dict) -> dict:
    """POSTs `body` with stream: true and checks the SSE it gets against the grammar; returns the summary."""
    req = urllib.request.Request(urls(role)[0] + "/v1/responses", data=json.dumps({**body, "stream": True}).encode(),
                                 method="POST", headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.status == 200, r.status
        assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers.get("content-type")
        lines = [raw.decode().rstrip("\n") for raw in r]
    return validate(lines)


def calls(resp, kind: str) -> list:
    return [o for o in resp.output if o.type == kind]


# --- text ----------------------------------------------------------------------------------------------------------
def test_create_text(urls):
    r = sdk(urls).responses.create(model=MODEL, input="Write one short sentence about the sea.",
                                   instructions="You are terse.", max_output_tokens=32, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_"), r
    assert r.status in ("completed", "incomplete"), r.status
    assert r.model == MODEL, f"model {r.model!r}, the client asked for {MODEL!r}"
    assert r.output_text.strip(), f"no text: {r.output}"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0, r.usage
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
    assert 0 <= r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens, r.usage


def test_stream_text_sdk_and_grammar(urls):
    body = {"model": MODEL, "input": [{"role": "developer", "content": "You are terse."},
                                      {"role": "user", "content": [{"type": "input_text",
                                                                    "text": "Write one short sentence about the sea."}]}],
            # Room to end the turn: the SDK's get_final_response wants response.completed, not .incomplete.
            "max_output_tokens": 256, "temperature": 0}
    deltas = []
    kinds = []
    with sdk(urls).responses.stream(**body) as s:
        for ev in s:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = s.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "".join(deltas) == final.output_text and final.output_text.strip(), (deltas, final.output_text)
    summary = raw_stream(urls, "text", body)
    assert [i["type"] for i in summary["items"]] == ["message"], summary["items"]
    assert summary["usage"]["output_tokens"] > 0, summary["usage"]


def test_max_output_tokens_is_incomplete(urls):
    body = {"model": MODEL, "input": "Write a long story about a cat and a dog who live on a farm.",
            "max_output_tokens": 16, "temperature": 0}
    r = sdk(urls).responses.create(**body)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", (r.status, r.incomplete_details)
    assert 0 < r.usage.output_tokens <= 16, r.usage
    summary = raw_stream(urls, "text", body)
    assert summary["status"] == "incomplete" and summary["events"][-1] == "response.incomplete", summary["events"][-3:]


# --- tools ---------------------------------------------------------------------------------------------------------
def test_function_call_forced_and_round_trip(urls):
    client = sdk(urls, "tools")
    r = client.responses.create(model=MODEL, input=WEATHER_Q, tools=[WEATHER_TOOL], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=128)
    fcs = calls(r, "function_call")
    assert len(fcs) == 1 and fcs[0].name == "get_weather", r.output
    # JSON, as the protocol guarantees; what the 135M model puts in it is its own business.
    assert isinstance(json.loads(fcs[0].arguments), dict), fcs[0].arguments
    assert fcs[0].call_id and fcs[0].status == "completed", fcs[0]
    # The second turn carries the call and its output: the upstream must accept the history and answer in text.
    history = [{"role": "user", "content": WEATHER_Q},
               {"type": "function_call", "call_id": fcs[0].call_id, "name": "get_weather", "arguments": fcs[0].arguments},
               {"type": "function_call_output", "call_id": fcs[0].call_id, "output": "Sunny, 21 C."}]
    r2 = client.responses.create(model=MODEL, input=history, tools=[WEATHER_TOOL], tool_choice="none",
                                 max_output_tokens=24)
    assert r2.status in ("completed", "incomplete") and not calls(r2, "function_call"), r2.output
    assert r2.output_text.strip(), r2.output


def test_function_call_stream_grammar(urls):
    body = {"model": MODEL, "input": WEATHER_Q, "tools": [WEATHER_TOOL], "tool_choice": "required",
            "parallel_tool_calls": False, "max_output_tokens": 128}
    with sdk(urls, "tools").responses.stream(**body) as s:
        final = s.get_final_response()
    assert [c.name for c in calls(final, "function_call")] == ["get_weather"], final.output
    summary = raw_stream(urls, "tools", body)
    assert "response.function_call_arguments.delta" in summary["events"], summary["events"]
    fc = [i for i in summary["items"] if i["type"] == "function_call"]
    assert fc and fc[0]["name"] == "get_weather", summary["items"]


def test_custom_tool_is_a_custom_tool_call(urls):
    # Codex offers apply_patch as a freeform tool to models it knows: upstream it is a function with one string
    # argument; the client must get a custom_tool_call with the raw input back, streamed with its own events.
    body = {"model": MODEL, "input": "Create hello.txt containing hello.", "tools": [PATCH_TOOL],
            "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 96}
    r = sdk(urls, "tools").responses.create(**body)
    ctc = calls(r, "custom_tool_call")
    assert len(ctc) == 1 and ctc[0].name == "apply_patch" and isinstance(ctc[0].input, str), r.output
    assert not calls(r, "function_call"), r.output
    summary = raw_stream(urls, "tools", body)
    assert "response.custom_tool_call_input.done" in summary["events"], summary["events"]
    assert "response.function_call_arguments.delta" not in summary["events"], summary["events"]


def test_structured_output(urls):
    fmt = {"type": "json_schema", "name": "city", "strict": True,
           "schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                      "required": ["city"], "additionalProperties": False}}
    r = sdk(urls).responses.create(model=MODEL, input="Name a city in France.", text={"format": fmt},
                                            max_output_tokens=64, temperature=0)
    assert r.status == "completed", (r.status, r.output_text)
    v = json.loads(r.output_text)
    assert isinstance(v, dict) and isinstance(v.get("city"), str), v


def test_hosted_tools_are_left_out_not_refused(urls):
    r = sdk(urls).responses.create(model=MODEL, input="Say hi.", tools=[{"type": "web_search"}],
                                   max_output_tokens=8, store=False, include=["reasoning.encrypted_content"],
                                   prompt_cache_key="e2e-session-1")
    assert r.status in ("completed", "incomplete") and r.output, r


# --- errors and models ---------------------------------------------------------------------------------------------
def test_errors_in_openai_shape(urls):
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(urls, key="wrong-key").responses.create(model=MODEL, input="hi", max_output_tokens=8)
    assert e.value.status_code == 401 and isinstance(e.value.body, dict) and e.value.body.get("message"), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        sdk(urls).responses.create(model=MODEL, input="hi", previous_response_id="resp_123", max_output_tokens=8)
    assert "previous_response_id" in str(e.value.body), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        sdk(urls).responses.create(model=MODEL, input=[{"type": "message", "role": "user", "content": 5}])
    assert "input[0]" in str(e.value.body), f"the error names no JSON path: {e.value.body}"


def test_models_list_in_openai_shape(urls):
    models = sdk(urls).models.list()
    ids = [m.id for m in models.data]
    assert ids and all(m.object == "model" for m in models.data), models
    # The same endpoint answers an Anthropic client in Anthropic's shape.
    status, body = http_json("GET", urls("text")[0] + "/v1/models", key=KEY)
    assert status == 200 and isinstance(body, dict) and body.get("object") == "list", body


def test_disconnect_cancels_generation(urls):
    # As for /v1/messages: the tools server seldom ends a turn by itself; once text flows and the client leaves,
    # only a cancellation makes the slot idle again within seconds.
    proxy, up = urls("tools")
    assert poll(lambda: not slots_busy(up), 120), "the tools llama-server is still busy from an earlier request"
    story = "The farmer walked to the barn and counted the animals one by one. " * 20
    client = sdk(urls, "tools")
    with client.responses.stream(model=MODEL, input=story + "\nContinue the story at length.",
                                 max_output_tokens=4000, temperature=0.7) as s:
        for ev in s:
            if ev.type == "response.output_text.delta":
                break
        else:
            raise AssertionError("the stream ended before any text")
        assert poll(lambda: slots_busy(up), 30), "the upstream slot is not busy: the turn ended by itself"
    assert poll(lambda: not slots_busy(up), 10), "llama-server is still generating 10 s after the client left"
