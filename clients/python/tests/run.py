#!/usr/bin/env python3
"""Runs the package's tests with unittest, from a checkout (no install
needed), and ends with the line CI reads: ``python: N passed, N failed,
N skipped`` (a module or class skipped in its setUpModule or setUpClass
counts as one skipped). Exits 1 if a test failed or errored, or if none
passed.

    python3 clients/python/tests/run.py            # every test
    python3 clients/python/tests/run.py --unit     # test_wire, test_client, test_run only
    PKTDIST_PY_REQUIRE_E2E=1 python3 ...           # a skipped end-to-end test fails

test_e2e (a real pktdist on virtual devices) and test_testbed (the example
backend on the namespace test bed) need root and target/release/pktdist;
test_install needs pip.
"""

from __future__ import annotations

import argparse
import sys
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNIT = ["test_wire", "test_client", "test_run"]


class Result(unittest.TextTestResult):
    """Counts the tests that passed as they pass: testsRun does not count
    a module or class skipped (or failed) in setUpModule or setUpClass, so
    passes cannot be worked out from it."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.passed += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unit", action="store_true", help="only the unit tests")
    p.add_argument("-q", "--quiet", action="store_true", help="one dot per test")
    args = p.parse_args()
    sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]
    loader = unittest.defaultTestLoader
    if args.unit:
        suite = loader.loadTestsFromNames(UNIT)
    else:
        suite = loader.discover(str(HERE), pattern="test_*.py", top_level_dir=str(HERE))
    runner = unittest.TextTestRunner(
        stream=sys.stdout, verbosity=1 if args.quiet else 2, resultclass=Result
    )
    result = runner.run(suite)
    assert isinstance(result, Result)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.passed
    print(f"python{sys.version_info[0]}.{sys.version_info[1]}: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
