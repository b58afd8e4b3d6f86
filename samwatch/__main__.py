from samwatch.cli.main import main

raise SystemExit(main())
