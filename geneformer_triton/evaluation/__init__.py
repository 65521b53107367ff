"""evaluation layer of geneformer_triton (see docs/DESIGN.md)."""
