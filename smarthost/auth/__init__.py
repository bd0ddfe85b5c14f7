"""Who the client is.

- :mod:`~smarthost.auth.users`: the users file (format, parsing, rewriting) and the secrets
  looked up in it; :mod:`~smarthost.auth.derived`: the secrets derived from a password
  (with :mod:`~smarthost.auth.md5state`, the resumable MD5 CRAM-MD5 needs);
  :mod:`~smarthost.auth.decoys`: stand-ins for names without them.
- :mod:`~smarthost.auth.sasl`: the SASL mechanisms, one module per family.
- :mod:`~smarthost.auth.cred`: the twisted.cred glue the session logs in through;
  :mod:`~smarthost.auth.oauth`: bearer tokens and their checker.
"""
