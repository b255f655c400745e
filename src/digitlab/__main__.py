"""`python -m digitlab`: the `digitlab` command (cli.main)."""

from digitlab.cli import main

raise SystemExit(main())
