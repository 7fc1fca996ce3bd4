"""``python -m train`` / ``torchrun -m train``: the ``train`` command."""
from .cli import main

main()
