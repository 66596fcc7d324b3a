"""``python -m compresskit`` (and ``torchrun -m compresskit``) runs the command line."""

from compresskit.cli import main

main()
