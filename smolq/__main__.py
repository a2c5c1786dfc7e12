import sys

from smolq.cli import main

sys.exit(main())
