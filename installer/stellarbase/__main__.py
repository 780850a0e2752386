"""Entry point of `python -m stellarbase` and of the one-file binary: see `stellarbase.cli`."""

from stellarbase.cli import main

main()
