"""``python -m zipage``: the ``zipage`` command (see ``zipage_cli``)."""

import sys

from zipage_cli import main

sys.exit(main())
