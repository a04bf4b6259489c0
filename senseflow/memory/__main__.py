"""``python -m senseflow.memory``: the same as ``senseflow memory``."""
from senseflow.memory.cli import main_memory

raise SystemExit(main_memory())
