"""``python -m geneformer_triton.cli``: the ``gftriton`` command."""

from geneformer_triton.cli import main

raise SystemExit(main())
