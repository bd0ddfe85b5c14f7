"""The durable queue, the only bridge between receiving and delivering: the spool's API and
group commit (spool), the segment format (segment) and the index with recovery and compaction
(index). README.md states the invariants.
"""
