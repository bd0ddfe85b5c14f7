"""Deprecated: ``smarthost.envelope`` moved to :mod:`smarthost.core.envelope`.

Kept for one release so plugins written against the flat layout keep loading (with a
DeprecationWarning at import); a plugin should import only :mod:`smarthost.api`.
"""

import warnings
from typing import Any

from smarthost.core import envelope as _moved

warnings.warn(
    "smarthost.envelope is deprecated and goes away in the next release; "
    "import from smarthost.api",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
