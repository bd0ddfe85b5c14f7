"""Delivering what the spool holds: when (scheduler), where (routing and DNS), how (the SMTP
client and agent, maildir) and the reports to the sender (bounce). It reads and updates the
queue only through ``api.ISpool``.
"""
