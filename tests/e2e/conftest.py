"""Session fixtures: the real stack (llama-servers with a real model, `llmctl serve-proxy` in front) and the target
under test. LLMCTL_E2E_TARGET=native points the same checks at llama-server's own /v1/messages instead (to compare);
the default is llmctl."""

from __future__ import annotations

import os

import pytest

from stack import TARGETS, Stack, StackError


@pytest.fixture(scope="session")
def stack():
    try:
        s = Stack()
    except StackError as e:
        pytest.fail(str(e), pytrace=False)
    yield s
    s.close()


@pytest.fixture(scope="session")
def target(stack):
    name = os.environ.get("LLMCTL_E2E_TARGET", "llmctl")
    if name not in TARGETS:
        pytest.fail(f"LLMCTL_E2E_TARGET={name!r}: use one of {', '.join(TARGETS)}", pytrace=False)
    return TARGETS[name](stack)

