"""`python -m servekit.cli`: the same as the `servekit` command."""

from servekit.cli import main

main()
