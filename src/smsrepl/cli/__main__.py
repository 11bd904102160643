"""``python -m smsrepl.cli``, as before the command line became a package."""
from smsrepl.cli import main

raise SystemExit(main())
