from retnet.cli import main

raise SystemExit(main())
