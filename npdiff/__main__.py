from npdiff.cli import main

raise SystemExit(main())
