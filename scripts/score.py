from rlmeta.scoring import main

raise SystemExit(main())
