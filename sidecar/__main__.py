"""`python -m sidecar` is the `task-tracking` command."""

from sidecar.cli import main

raise SystemExit(main())
