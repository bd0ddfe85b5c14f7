"""Makes ``twistd smarthost`` exist; everything else lives in :mod:`smarthost.tap`."""

from smarthost.tap import service_maker

smarthost = service_maker
