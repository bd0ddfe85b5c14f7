"""The durable queue, the only bridge between receiving and delivering: the spool's API and
group commit (spool, incoming, writer), the segment format (segment), the index (index),
start-up recovery and what it sets aside (recovery, corrupt, directory), and reading damage
back (salvage, crcfix). README.md states the invariants.
"""
