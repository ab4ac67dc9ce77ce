"""`python -m eucareg` runs the command line."""

from eucareg.cli.main import main

main()
