"""Shared by every part and importing nothing else of ours: the envelope values (Address,
QueueId, QueueEntry, Outcome), every SMTP reply, errors and types that cross rooms, the
durable-file helpers and the operator log.
"""
