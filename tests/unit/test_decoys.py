"""The decoy key: stand-in SCRAM salts must survive a restart and reveal nothing of the key."""
# trial's assertion methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import hashlib
import hmac

from twisted.trial.unittest import SynchronousTestCase

from smarthost.auth.decoys import Decoys, decoy_key

TLS_KEY = b"-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n"


class DecoyKeyTests(SynchronousTestCase):
    def test_the_same_secret_gives_the_same_key(self) -> None:
        # A restart reads the same TLS key: decoy salts must come out the same.
        self.assertEqual(decoy_key(TLS_KEY), decoy_key(bytes(TLS_KEY)))

    def test_another_secret_gives_another_key(self) -> None:
        self.assertNotEqual(decoy_key(TLS_KEY), decoy_key(TLS_KEY + b"\n"))

    def test_the_key_is_not_the_secret(self) -> None:
        key = decoy_key(TLS_KEY)
        self.assertNotEqual(key, TLS_KEY)
        self.assertNotIn(key, TLS_KEY)
        self.assertEqual(len(key), hashlib.sha256().digest_size)

    def test_the_derivation_is_the_one_installations_already_use(self) -> None:
        # Changing it would change every decoy salt once, on upgrade, which is exactly the
        # change across a restart the key exists to prevent.
        self.assertEqual(decoy_key(TLS_KEY),
                         hmac.digest(TLS_KEY, b"smarthost SCRAM decoys", "sha256"))

    def test_decoy_salts_from_the_key_survive_a_restart(self) -> None:
        before = Decoys(decoy_key(TLS_KEY)).scram("nobody", "SCRAM-SHA-256", 4096)
        after = Decoys(decoy_key(TLS_KEY)).scram("nobody", "SCRAM-SHA-256", 4096)
        self.assertEqual(before, after)
        self.assertNotEqual(before.salt, Decoys(decoy_key(b"other")).scram(
            "nobody", "SCRAM-SHA-256", 4096).salt)
