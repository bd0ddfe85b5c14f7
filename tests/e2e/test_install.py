"""Every way of installing smarthost gives a ``twistd`` that lists ``smarthost``, run from
another directory: the Makefile's editable install (the project's .venv), a plain
``pip install -e .`` and a plain ``pip install .`` (a wheel). Twisted finds our plugin file
by scanning sys.path for ``twisted/plugins/``, so this is about where the build backend
puts that file, not about our code.

The fresh environments reuse the project venv's dependencies through a path file (no second
download of Twisted); only smarthost itself is installed into them, with pip's build
isolation fetching the build backend as a user's pip would.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LISTS = (
    "import contextlib, io, sys\n"
    "from twisted.scripts.twistd import run\n"
    "sys.argv = ['twistd', '--help']\n"
    "out = io.StringIO()\n"
    "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
    "    run()\n"
    "print('\\n'.join(l.split()[0] for l in out.getvalue().splitlines() if l.startswith('    ')))\n"
)


def twistd_commands(python: Path, cwd: Path) -> list[str]:
    result = subprocess.run([str(python), "-c", LISTS], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_makefile_venv_lists_smarthost(tmp_path: Path) -> None:
    assert "smarthost" in twistd_commands(Path(sys.executable), tmp_path)


@pytest.mark.parametrize("editable", [True, False], ids=["pip install -e .", "pip install ."])
def test_a_plain_pip_install_lists_smarthost(tmp_path: Path, editable: bool) -> None:
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    # The dependencies, from the project's venv: a bare path entry, so that venv's own path
    # files (its editable smarthost among them) are NOT processed here.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", *target],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        # The embedded default config ships inside the package (read at import).
        [str(python), "-c", "import smarthost.app.config as c; print(c.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert where.startswith(str(ROOT) if editable else site), where
    assert "smarthost" in twistd_commands(python, elsewhere)
