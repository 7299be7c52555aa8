from trojanguard.cli import main

raise SystemExit(main())
