import sys

from kcore.cli import main

sys.exit(main())
