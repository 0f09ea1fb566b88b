from stagerl.cli import main

raise SystemExit(main())
