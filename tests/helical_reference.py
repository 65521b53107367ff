"""Run helical 3.1.4's Geneformer on an .h5ad and save its token ids and embeddings (reference side).

Runs inside the helical venv (Python 3.12, numpy 2, torch 2.10), never in the project's venv:
    .venv-helical/bin/python tests/helical_reference.py CACHE_PREFIX MODEL_NAME IN.h5ad OUT.npz [--embed N]
CACHE_PREFIX holds ``.cache/helical/models/geneformer/<v>/...`` (dictionaries + checkpoint); helical runs
offline from it. Output: ``lengths`` [cells], ``input_ids`` (concatenated), ``embeddings`` [N, H] float32
for the first N cells (embedded with helical's get_embeddings, emb_mode "cell", emb_layer -1).
"""

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_prefix")
    parser.add_argument("model_name")
    parser.add_argument("h5ad")
    parser.add_argument("out")
    parser.add_argument("--embed", type=int, default=0, help="embed the first N cells (0: tokenize only)")
    args = parser.parse_args()
    os.environ["CACHE_DIR_HELICAL_PREFIX"] = args.cache_prefix

    import anndata as ad
    import numpy as np
    from helical.models.geneformer import Geneformer, GeneformerConfig

    model = Geneformer(GeneformerConfig(model_name=args.model_name, device="cpu", batch_size=10))
    adata = ad.read_h5ad(args.h5ad)
    dataset = model.process_data(adata, gene_names="ensembl_id")
    ids = [np.asarray(x, dtype=np.int64) for x in dataset["input_ids"]]
    result = {"lengths": np.array([len(x) for x in ids]), "input_ids": np.concatenate(ids)}
    if args.embed:
        subset = dataset.select(range(min(args.embed, len(dataset))))
        result["embeddings"] = np.asarray(model.get_embeddings(subset), dtype=np.float32)
    np.savez(args.out, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
