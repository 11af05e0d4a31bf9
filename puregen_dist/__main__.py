"""``python -m puregen_dist`` -> the CLI."""

from puregen_dist.cli import main

raise SystemExit(main())
