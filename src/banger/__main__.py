from banger.cli import main

raise SystemExit(main())
