"""The layout's promises that are not ordinary behaviour: the import-linter contracts really
fail on a forbidden import, the twistd plugin files import nothing of ours, and the old flat
import paths of the plugin API still work (with a warning) for one release."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import smarthost.api
import smarthost.core.envelope
import smarthost.core.replies

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("smarthost.interfaces", "IRcptCheck", smarthost.api),
        ("smarthost.envelope", "Client", smarthost.core.envelope),
        ("smarthost.reply", "Reply", smarthost.core.replies),
    ],
)
def test_old_plugin_import_paths_warn_and_give_the_same_objects(
    old: str, name: str, new: object
) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert getattr(module, name) is getattr(new, name)


def _modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'smarthost'))"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT / "tests",
    )
    return [line for line in out.stdout.splitlines() if line.startswith("[")][-1:]


def test_twistd_plugin_files_import_nothing_of_ours() -> None:
    code = "import twisted.plugins.smarthost_plugin, twisted.plugins.smarthost_checkers"
    assert _modules_after(code) == ["[]"]


def test_twistd_help_lists_smarthost_without_importing_it() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from twisted.scripts.twistd import run\n"
        "sys.argv = ['twistd', '--help']\n"
        "out = io.StringIO()\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
        "    run()\n"
        "assert 'smarthost' in out.getvalue(), out.getvalue()\n"
    )
    assert _modules_after(code) == ["[]"]


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("smtpd/policy.py", "from smarthost.delivery import scheduler", "Layers"),
        ("delivery/courier.py", "from smarthost.queue import segment", "through api.ISpool"),
        ("plugins/dnsbl.py", "from smarthost.smtpd import hooks", "Shipped plugins"),
        ("queue/spool.py", "from twisted.internet import reactor", "global reactor"),
        ("auth/users.py", "from twisted.internet.threads import deferToThread", "global reactor"),
    ],
)
def test_import_linter_fails_on_a_forbidden_import(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "smarthost", copy / "smarthost",
                    ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    (copy / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "layout_contract.py", copy / "tests")
    shutil.copy(ROOT / "pyproject.toml", copy)
    clean = subprocess.run([str(LINT_IMPORTS)], cwd=copy, capture_output=True, text=True,
                           timeout=120)
    assert clean.returncode == 0, clean.stdout
    with (copy / "smarthost" / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = subprocess.run([str(LINT_IMPORTS)], cwd=copy, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert any(broken in row and "BROKEN" in row for row in result.stdout.splitlines())
