"""The daemon's long-lived objects and Python's cyclic garbage collector.

Start-up leaves hundreds of thousands of objects that live as long as the daemon (modules,
Twisted, the configuration, the spool's index, the scheduler's queue), and every full pass
of the collector walks all of them again: three full passes in an accept run of 5,000
messages took 0.10 s of the daemon's 1.8 s of CPU. :func:`settle` collects once and then
freezes what is left (``gc.freeze``: later passes skip it). Measured with bench/run (accept,
20 sessions, one process, two alternating pairs): the collector's time 0.156/0.169 s ->
0.073/0.070 s a run, 2,923/2,725 -> 3,030/3,092 msg/s.

A frozen object that becomes garbage is still freed by its reference count; only garbage in
a cycle stays. So a reload settles again: it unfreezes, collects (the generation the reload
before it replaced, if sessions no longer hold it) and freezes anew; what is frozen and
dead is at most the one generation the last reload replaced while sessions still held it.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect everything once, then leave what survives out of later collections."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
