from samwatch.cli import main

raise SystemExit(main())
