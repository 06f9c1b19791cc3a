"""``python -m devices.agent``: the agent's command line."""

from devices.agent.cli import main

raise SystemExit(main())
