"""Makes ``--auth smarthost-users:PATH`` exist for every twistd server. Lazy: twistd imports
this file on every run, so it imports nothing of ours until a server asks for the checker
(:func:`smarthost.app.credfactory.users_checker`)."""

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

HELP = """\
Checks user names and passwords against a smarthost users file: one
"name:$2b$..." line per user (bcrypt; htpasswd -B files work too), as written
by `smarthost passwd --users PATH NAME`. The file is re-read when it changes;
bcrypt runs in the reactor's thread pool.
"""


@implementer(ICheckerFactory, IPlugin)
class SmarthostUsersCheckerFactory:
    authType = "smarthost-users"
    authHelp = HELP
    argStringFormat = "Path of a smarthost users file (bcrypt)."
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> ICredentialsChecker:
        from smarthost.app.credfactory import users_checker

        return users_checker(argstring, self.authType)


# Only this name may hold the factory: getPlugins takes every module attribute providing
# IPlugin, so a second name would list it twice.
smarthost_users = SmarthostUsersCheckerFactory()
