"""`python -m recserve`: the same as the `recserve` command."""

from recserve.cli import main

raise SystemExit(main())
