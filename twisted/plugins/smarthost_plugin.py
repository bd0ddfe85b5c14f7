"""Makes ``twistd smarthost`` exist. Lazy, as Twisted's own plugin files are: twistd imports
every file in twisted/plugins/ on each run, so this one names the module that does the work
(:mod:`smarthost.app.tap`) and imports nothing of ours until ``twistd smarthost`` runs."""

from twisted.application.service import ServiceMaker

# One module attribute only: getPlugins lists every attribute that provides IPlugin.
smarthost = ServiceMaker(
    "smarthost",
    "smarthost.app.tap",
    "An authenticated SMTP smart host (submission, relay, delivery).",
    "smarthost",
)
