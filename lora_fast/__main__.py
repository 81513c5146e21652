"""``python -m lora_fast``: the same command line as ``lora-fast`` (see lora_fast/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
