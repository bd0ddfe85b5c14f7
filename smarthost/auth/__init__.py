"""Who the client is: the users file and the secrets derived from passwords, the SASL
mechanisms, and the twisted.cred glue the session logs in through.
"""
