"""``python -m fxprune`` runs the command line."""
from .cli import main

main()
