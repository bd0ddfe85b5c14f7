"""The plugin namespace: ``twisted.plugin.getPlugins(ISmarthostPlugin, smarthost.plugins)``.

Like ``twisted.plugins``, every ``smarthost/plugins/`` directory on ``sys.path`` is searched,
so a third-party distribution adds a plugin by shipping one file,
``smarthost/plugins/<name>.py`` (with no ``__init__.py`` beside it).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[no-untyped-call]
__all__: list[str] = []
