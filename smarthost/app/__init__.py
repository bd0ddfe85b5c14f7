"""The application around the parts: twistd glue, the object graph (wiring), the services,
the control channel, the admin CLI, configuration and certificates. The only room that
touches the global reactor.
"""
