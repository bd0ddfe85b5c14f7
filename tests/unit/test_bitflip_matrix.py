"""The bit-flip matrix, small: one bit flipped in each field of each record kind (segment
headers, message/state/removed headers, CRCs, ids, JSON, bodies, batch markers), in the newest
segment, an older one and one in the format before the nonce; recovery, the daemon's log lines
and salvage checked after each (issue 18: "0 acknowledged messages lost without a log line
naming them"). ``scripts/bitflip_matrix.py`` flips every byte; this keeps the same code in the
suite."""

from __future__ import annotations

import sys
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(_SCRIPTS))

import bitflip_matrix  # noqa: E402


def test_one_flipped_bit_anywhere_loses_nothing_unnamed(tmp_path: Path) -> None:
    matrix = bitflip_matrix.run(tmp_path)
    print(matrix.summary())  # shown with -s or on failure
    total = matrix.total
    places = {place.split(": ")[0] for place in matrix.by_place}
    assert places == {"newest", "older", "older (old format)"}
    kinds = {place.split(": ")[1].split()[0] for place in matrix.by_place}
    assert kinds == {"segment", "message", "state", "removed", "marker"}
    assert total.flips > 200
    assert total.lost_named > 0
    assert total.lost_silent == 0
    assert total.duplicates == 0
    assert total.damaged_served == 0
    assert total.unknown == 0
    assert total.reported_again == 0
    assert total.salvaged == total.lost_named  # every single-bit loss can be undone
    assert total.salvaged_wrong == 0
    assert total.held > 0  # lost updates of queued messages wait for the operator
