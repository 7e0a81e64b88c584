"""The official Anthropic Python SDK against the target (llmctl by default): every check of checks.py is a test."""

import pytest

from checks import CHECKS
from stack import StackError


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_conformance(target, check):
    try:
        check(target)
    except StackError as e:
        pytest.fail(str(e), pytrace=False)
