"""python -m trojanguard.cli: the trojanguard command (as python -m trojanguard)."""

from trojanguard.cli import main

raise SystemExit(main())
