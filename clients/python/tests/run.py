#!/usr/bin/env python3
"""Runs the package's tests with unittest, from a checkout (no install
needed), and ends with the line CI reads: ``python: N passed, N failed,
N skipped``. Exits 1 if a test failed or errored, or if none ran.

    python3 clients/python/tests/run.py            # every test
    python3 clients/python/tests/run.py --unit     # test_wire and test_client only
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
UNIT = ["test_wire", "test_client"]


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
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if args.quiet else 2).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = max(0, result.testsRun - failed - skipped - len(result.expectedFailures))
    print(f"python{sys.version_info[0]}.{sys.version_info[1]}: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
