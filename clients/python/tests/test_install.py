"""The package installs with pip (from pyproject.toml, standard library
only) and the installed copy is complete: its modules, py.typed, and the
version and license expression in its metadata."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("PKTDIST_PY_REQUIRE_E2E") == "1"


def has_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


def local_setuptools_fits() -> bool:
    """Whether this interpreter's setuptools can build the package offline:
    pyproject.toml's license as an SPDX string needs setuptools 77 (as its
    build-system says), which builds wheels without the wheel package."""
    code = (
        "import setuptools, sys\n"
        "v = tuple(int(x) for x in setuptools.__version__.split('.')[:2])\n"
        "sys.exit(int(v < (77, 0)))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


class Install(unittest.TestCase):
    def test_pip_installs_a_complete_typed_package(self) -> None:
        if not has_pip():
            if REQUIRE:
                self.fail("pip is missing")
            self.skipTest("pip is missing")
        with tempfile.TemporaryDirectory(prefix="pktdist-py-install-") as tmp:
            # Built from a copy: a build leaves build/ and *.egg-info behind.
            source = Path(tmp) / "source"
            shutil.copytree(
                PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
            )
            target = str(Path(tmp) / "target")
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--no-deps", "--target", target, str(source)]
            if local_setuptools_fits():
                # Build with the setuptools at hand rather than fetch one
                # (otherwise pip fetches it from the package index).
                cmd.insert(4, "--no-build-isolation")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                               cwd=tempfile.gettempdir())
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            installed = Path(target) / "pktdist"
            for f in ("__init__.py", "client.py", "errors.py", "_wire.py", "py.typed"):
                self.assertTrue((installed / f).is_file(), f"{f} not installed")
            self.assertFalse((installed / "tests").exists())
            probe = (
                "import importlib.metadata as m, pktdist, sys;"
                "assert pktdist.__file__.startswith(sys.argv[1]), pktdist.__file__;"
                "assert m.version('pktdist') == pktdist.__version__, m.version('pktdist');"
                # The license as an SPDX expression (PEP 639), not the
                # deprecated table form.
                "assert m.metadata('pktdist')['License-Expression'] == 'Apache-2.0', dict(m.metadata('pktdist'));"
                "print(pktdist.Client, pktdist.PROTOCOL_VERSION)"
            )
            env = dict(os.environ, PYTHONPATH=target)
            r = subprocess.run([sys.executable, "-c", probe, target], capture_output=True, text=True,
                               env=env, cwd=tempfile.gettempdir(), timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("pktdist.client.Client", r.stdout)


if __name__ == "__main__":
    unittest.main()
