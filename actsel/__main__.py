import sys

from actsel.cli.main import main

sys.exit(main())
