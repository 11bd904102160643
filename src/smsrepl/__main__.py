import sys

from smsrepl.cli import main

sys.exit(main())
