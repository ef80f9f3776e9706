"""``python -m fdrtd_server`` is ``fdrtd-server``."""

from fdrtd_server.cli import main

raise SystemExit(main())
