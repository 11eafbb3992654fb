"""`./dev bench train_adapters`: runs seqr_eval.train_adapters (the module lives in the seqr_eval package)."""

import sys

from seqr_eval.train_adapters import main

if __name__ == "__main__":
    sys.exit(main())
