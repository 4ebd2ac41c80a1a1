import sys

from ditserve.cli import main

sys.exit(main())
