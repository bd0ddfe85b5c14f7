"""Delivering what the spool holds: when (scheduler, with the pure rules in recording), where
(routing, dns, and hostcache, the one memory of failed hosts), how (the SMTP client and agent
with its connection cache, maildir) and what the sender is told (reporting; the RFC 3464 report
itself in bounce, dsn and returned). It reads and updates the queue only through
``api.ISpool``.
"""
