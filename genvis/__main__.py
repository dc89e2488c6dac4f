import sys

from genvis.cli import main

sys.exit(main())
