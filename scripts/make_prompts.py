from rlmeta.prompts import main

raise SystemExit(main())
