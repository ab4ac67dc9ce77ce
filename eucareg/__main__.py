"""`python -m eucareg` runs the command line."""

from eucareg.cli import main

main()
