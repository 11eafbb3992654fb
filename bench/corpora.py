"""`./dev bench corpora`: runs seqr_eval.corpora (the module lives in the seqr_eval package)."""

import sys

from seqr_eval.corpora import main

if __name__ == "__main__":
    sys.exit(main())
