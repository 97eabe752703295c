from miner.cli import main

raise SystemExit(main())
