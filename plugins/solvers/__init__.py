"""Built-in solvers (the ``--update`` stage)."""
