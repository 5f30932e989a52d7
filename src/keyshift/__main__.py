"""`python -m keyshift`: the `keyshift` command."""

from keyshift.cli.main import main

main()
