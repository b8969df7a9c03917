"""`python -m moe_lab ...` (also what torchrun runs with `-m moe_lab`)."""

import sys

from moe_lab.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
