"""``python -m tensorslim`` (also what ``torchrun -m tensorslim`` runs)."""

from tensorslim.cli import main

main()
