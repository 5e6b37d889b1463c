"""`python -m egressd` is the `egressd` command."""

from egressd.cli import main

main()
