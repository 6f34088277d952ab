"""``python -m rvclora``: the ``rvclora`` command."""

from .cli import main

raise SystemExit(main())
