"""Where each worker's spool is, and which spools `smarthost queue` must see."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smarthost.app import workerspools
from smarthost.app.config import Config, parse_config


def config(tmp_path: Path, workers: int) -> Config:
    return parse_config(f'[server]\nworkers = {workers}\n[queue]\ndirectory = "spool"\n',
                        tmp_path)


def test_one_worker_keeps_the_spool_where_it_always_was(tmp_path: Path) -> None:
    one = config(tmp_path, 1)
    assert workerspools.worker_count(one) == 1
    assert workerspools.worker_spool(one, 1) == tmp_path / "spool"
    assert workerspools.spool_directories(one) == [tmp_path / "spool"]


def test_zero_means_one_per_core(tmp_path: Path) -> None:
    assert workerspools.worker_count(config(tmp_path, 0)) == (os.cpu_count() or 1)


def test_each_worker_has_its_own_spool(tmp_path: Path) -> None:
    three = config(tmp_path, 3)
    root = tmp_path / "spool"
    assert [workerspools.worker_spool(three, i) for i in (1, 2, 3)] == [
        root / "worker-1", root / "worker-2", root / "worker-3"]
    assert workerspools.worker_index(root / "worker-3") == 3
    assert workerspools.worker_index(root) is None
    with pytest.raises(ValueError):
        workerspools.worker_spool(three, 0)
    # Listed whether they exist yet or not: the daemon makes them.
    assert workerspools.spool_directories(three) == [
        root / "worker-1", root / "worker-2", root / "worker-3"]


def test_spools_nobody_serves_any_more_stay_visible(tmp_path: Path) -> None:
    """Fewer workers than before, or mail left in the root spool from the days of one
    worker: that mail is still listed (and can be deleted)."""
    root = tmp_path / "spool"
    for name in ("worker-1", "worker-4", "worker-12", "worker-0", "worker-x", "other"):
        (root / name).mkdir(parents=True)
    (root / "worker-7").write_text("a file, not a spool")
    two = config(tmp_path, 2)
    assert workerspools.spool_directories(two) == [
        root / "worker-1", root / "worker-2", root / "worker-4", root / "worker-12"]
    (root / "log").mkdir()
    assert root not in workerspools.spool_directories(two)  # no segment: nothing there
    (root / "log" / "00000001.seg").write_bytes(b"")
    assert workerspools.spool_directories(two)[-1] == root
    # Back to one worker: the root first, then what the workers left.
    assert workerspools.spool_directories(config(tmp_path, 1)) == [
        root, root / "worker-1", root / "worker-4", root / "worker-12"]


def test_each_worker_ends_its_ids_with_its_own_number(tmp_path: Path) -> None:
    """So two workers never mint the same queue id (each checks only its own spool)."""
    assert workerspools.id_origin(tmp_path / "spool") == ""
    assert workerspools.id_origin(tmp_path / "spool" / "worker-3") == "03"
    assert workerspools.id_origin(tmp_path / "spool" / "worker-64") == "40"
