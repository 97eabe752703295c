from miner.cli.main import main

raise SystemExit(main())
