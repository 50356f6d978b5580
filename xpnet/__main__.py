"""``python -m xpnet`` is the ``xpnet`` command."""

from .cli import main

raise SystemExit(main())
