"""``python -m chainlora ...`` (also ``accelerate launch -m chainlora train ...``)."""

from chainlora.cli import main

raise SystemExit(main())
