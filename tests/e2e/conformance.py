#!/usr/bin/env python3
"""Runs the conformance checks of checks.py (the same ones the pytest suite runs) against llmctl serve-proxy and
against llama-server's native /v1/messages, on the same real llama-servers, and prints "passed X of N" per endpoint.

    eval "$(bash scripts/test-stack.sh)" && cargo build
    $LLMCTL_TEST_VENV/bin/python tests/e2e/conformance.py [--target llmctl] [--target native] [-k NAME]

Exit status 0 when every selected target passed every check.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from checks import CHECKS
from stack import TARGETS, Stack, StackError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("-k", dest="only", help="run only checks whose name contains this")
    ap.add_argument("-v", action="store_true", help="print the traceback of each failure")
    args = ap.parse_args()
    checks = [c for c in CHECKS if not args.only or args.only in c.__name__]
    try:
        stack = Stack()
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    totals = []
    try:
        for name in args.target or list(TARGETS):
            target = TARGETS[name](stack)
            passed = 0
            print(f"== {target.name}")
            for c in checks:
                try:
                    c(target)
                except StackError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                except Exception as e:  # noqa: BLE001 - any failure of a check is reported and counted
                    first = (str(e) or repr(e)).splitlines()[0][:160]
                    print(f"  FAIL {c.__name__}: {type(e).__name__}: {first}")
                    if args.v:
                        traceback.print_exc()
                else:
                    passed += 1
                    print(f"  ok   {c.__name__}")
            totals.append((target.name, passed))
    finally:
        stack.close()
    for name, passed in totals:
        print(f"{name}: passed {passed} of {len(checks)}")
    return 0 if all(p == len(checks) for _, p in totals) else 1


if __name__ == "__main__":
    sys.exit(main())
