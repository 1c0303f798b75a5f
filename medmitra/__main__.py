from medmitra.cli import main

raise SystemExit(main())
