"""`python -m lungedge` is the same as the `lungedge` command."""

from .cli import run

run()
