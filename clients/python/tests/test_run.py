"""run.py, the runner CI reads, on dummy test modules in a temporary
directory: its summary line counts what passed, and its exit status."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path
from typing import Dict, Tuple

RUN = Path(__file__).resolve().parent / "run.py"

PASS_TWO = """
import unittest
class T(unittest.TestCase):
    def test_one(self): pass
    def test_two(self): pass
"""
PASS_ONE = """
import unittest
class T(unittest.TestCase):
    def test_one(self): pass
"""
SKIPPED_MODULE = """
import unittest
def setUpModule():
    raise unittest.SkipTest("not here")
class T(unittest.TestCase):
    def test_one(self): pass
    def test_two(self): pass
"""
MIXED = """
import unittest
class Bad(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("no set-up")
    def test_never(self): pass
class T(unittest.TestCase):
    def test_passes(self): pass
    def test_fails(self): self.fail("no")
    @unittest.expectedFailure
    def test_expected(self): self.fail("known")
    @unittest.skip("later")
    def test_skipped(self): pass
"""


class Runner(unittest.TestCase):
    def run_on(self, modules: Dict[str, str]) -> Tuple[str, int]:
        """run.py's summary line and exit status on `modules` alone."""
        with tempfile.TemporaryDirectory(prefix="pktdist-py-run-") as tmp:
            shutil.copy(RUN, tmp)
            for name, text in modules.items():
                (Path(tmp) / f"{name}.py").write_text(textwrap.dedent(text))
            r = subprocess.run(
                [sys.executable, str(Path(tmp) / "run.py"), "--quiet"],
                capture_output=True, text=True, timeout=60, cwd=tmp,
            )
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        self.assertRegex(last, r"^python\d+\.\d+: \d+ passed, \d+ failed, \d+ skipped$", r.stdout + r.stderr)
        return last.split(": ", 1)[1], r.returncode

    def test_a_module_skipped_in_set_up_module_takes_no_pass_away(self) -> None:
        self.assertEqual(
            self.run_on({"test_a": PASS_TWO, "test_b": SKIPPED_MODULE}),
            ("2 passed, 0 failed, 1 skipped", 0),
        )
        # One test passed: that is not "none ran".
        self.assertEqual(
            self.run_on({"test_a": PASS_ONE, "test_b": SKIPPED_MODULE}),
            ("1 passed, 0 failed, 1 skipped", 0),
        )

    def test_none_passed_is_an_error(self) -> None:
        self.assertEqual(self.run_on({"test_b": SKIPPED_MODULE}), ("0 passed, 0 failed, 1 skipped", 1))
        self.assertEqual(self.run_on({}), ("0 passed, 0 failed, 0 skipped", 1))

    def test_failures_errors_and_expected_failures(self) -> None:
        # A failure and a setUpClass error are failed; an expected failure
        # is neither passed nor failed.
        self.assertEqual(
            self.run_on({"test_a": PASS_ONE, "test_m": MIXED}),
            ("2 passed, 2 failed, 1 skipped", 1),
        )


if __name__ == "__main__":
    unittest.main()
