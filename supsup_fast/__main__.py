"""``python -m supsup_fast ARGS`` is ``supsup-fast ARGS`` (and what torchrun launches: ``-m supsup_fast``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
