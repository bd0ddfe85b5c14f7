"""Makes ``twistd smarthost`` exist; everything else lives in :mod:`smarthost.app.tap`."""

from smarthost.app import tap

# One module attribute only: getPlugins lists every attribute that provides IPlugin.
smarthost = tap.service_maker
