"""Receiving: listeners (endpoints, PROXY, implicit TLS), the SMTP session, the DATA reader,
parameters, the Received: trace, relay policy, abuse limits and the plugin stages.
It hands each accepted message to the spool (through ``api.ISpool``) and never delivers.
"""
