from memtrain.cli.main import main

raise SystemExit(main())
