import sys

from seqr_cli.main import main

sys.exit(main())
