"""`python -m distill <command> ...` is `flowmap <command> ...`; under torchrun:

    torchrun --nproc-per-node 4 -m distill distill --method freeflow --teacher runs/t --out runs/s
"""

import sys

from flowmap.cli import main

sys.exit(main())
