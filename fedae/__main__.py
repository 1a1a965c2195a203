from fedae.cli import main

raise SystemExit(main())
