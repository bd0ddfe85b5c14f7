"""atomic_write: the one way a whole file is replaced (users file, TLS key and certificate)."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from smarthost.core import safeio
from smarthost.core.safeio import atomic_write


class AtomicWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="smarthost-safeio-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "file")

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_creates_the_file_private_whatever_the_umask(self) -> None:
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        atomic_write(self.path, b"secret")
        self.assertEqual(self.read(), b"secret")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_mode_is_the_callers_choice(self) -> None:
        atomic_write(self.path, b"certificate", mode=0o644)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)

    def test_replaces_by_rename_not_in_place(self) -> None:
        atomic_write(self.path, b"old")
        inode = os.stat(self.path).st_ino
        atomic_write(self.path, b"new")
        self.assertEqual(self.read(), b"new")
        self.assertNotEqual(os.stat(self.path).st_ino, inode)
        self.assertEqual(os.listdir(self.directory), ["file"])

    def test_a_failed_rename_keeps_the_old_file_and_no_temporary_one(self) -> None:
        atomic_write(self.path, b"old")

        def broken_replace(src: str, dst: str) -> None:
            raise OSError("disk on fire")

        self.patch(os, "replace", broken_replace)
        self.assertRaises(OSError, atomic_write, self.path, b"new")
        self.assertEqual(self.read(), b"old")
        self.assertEqual(os.listdir(self.directory), ["file"])

    def test_the_directory_is_fsynced_after_the_rename(self) -> None:
        events: list[str] = []
        real_replace, real_fsync_dir = os.replace, safeio.fsync_dir

        def replace(src: str, dst: str) -> None:
            events.append("replace")
            real_replace(src, dst)

        def fsync_dir(path: str) -> None:
            events.append(f"fsync_dir {path}")
            real_fsync_dir(path)

        self.patch(os, "replace", replace)
        self.patch(safeio, "fsync_dir", fsync_dir)
        atomic_write(self.path, b"data")
        self.assertEqual(events, ["replace", f"fsync_dir {self.directory}"])

    def test_a_directory_that_cannot_be_fsynced_is_not_an_error(self) -> None:
        def refuse(path: str) -> None:
            raise OSError(22, "Invalid argument")  # EINVAL, as some file systems answer

        self.patch(safeio, "fsync_dir", refuse)
        atomic_write(self.path, b"data")
        self.assertEqual(self.read(), b"data")

    def test_keeps_the_owner_of_the_file_it_replaces(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("only root can give a file to another owner")
        atomic_write(self.path, b"old")
        os.chown(self.path, 4321, 4321)
        atomic_write(self.path, b"new")
        st = os.stat(self.path)
        self.assertEqual((st.st_uid, st.st_gid), (4321, 4321))
