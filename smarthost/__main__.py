"""``python -m smarthost``: the same admin tool as the ``smarthost`` command."""

import sys

from smarthost.app.admin import main

sys.exit(main())
