from chat_api.cli import main

raise SystemExit(main())
