"""Makes ``--auth smarthost-users:PATH`` exist for every twistd server; see
:mod:`smarthost.app.credfactory`."""

from smarthost.app import credfactory

# Only this name may hold the factory: getPlugins takes every module attribute providing
# IPlugin, so a second name (``from ... import checker_factory``) would list it twice.
smarthost_users = credfactory.checker_factory
