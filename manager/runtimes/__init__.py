"""How containers run on a board, one module per implementation type (base.py: the seam).

Import only: the runtimes say which threads use them."""
