"""The crash matrix, small: ``kill -9`` the daemon under load a few times, restart it on the same
spool, and check that every message answered 250 reaches the MX (SPEC: "250 means on disk and
fsynced: a kill -9 right after loses nothing"). ``scripts/crash_matrix.py --cycles 50`` is the
long run; this keeps the same code in the suite."""

from __future__ import annotations

import sys
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(_SCRIPTS))

import crash_matrix  # noqa: E402


def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    # Seed 4 draws both kinds of moment: right after a 250, and while only delivering.
    settings = crash_matrix.Settings(
        cycles=6, seed=4, clients=2, messages_per_client=10, drain_timeout=60
    )
    result = crash_matrix.run(settings, tmp_path, progress=print)
    print(result.summary())  # shown with -s or on failure: the duplicates figure among others
    assert {c.mode for c in result.cycles} == {"after-ack", "timed"}
    assert len(result.cycles) == 6
    assert result.acknowledged > 0
    assert result.drained, f"{result.remaining} messages still queued"
    assert result.lost == []
    assert result.corrupt == []
    assert result.damaged == []
    assert result.unknown == []
    assert result.bounces == 0
    assert result.recovery["corrupt"] == 0
    assert result.recovery["lost"] == 0
    assert result.ok
