from medvlsam2.core.cli import main

raise SystemExit(main())
