"""`python -m hf_dino_cli ...` is the `hf-dino` command."""

import sys

from . import main

sys.exit(main())
