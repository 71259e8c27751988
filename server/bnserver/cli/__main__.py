import sys

from bnserver.cli.main import main

sys.exit(main())
