"""``python -m examples.deepseek_v3.plan``: the report (see examples/deepseek_v3/plan/cli.py)."""

from examples.deepseek_v3.plan.cli import main

raise SystemExit(main())
