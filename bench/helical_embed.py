"""Time helical 3.1.4's Geneformer.get_embeddings on an .h5ad (runs INSIDE helical's own venv).

    $GFTRITON_HELICAL_PYTHON bench/helical_embed.py --model gf-6L-10M-i2048 --h5ad cells.h5ad --out out.npz

``CACHE_DIR_HELICAL_PREFIX`` must point at a helical cache holding the model (``geneformer_triton.bench.methods``
writes one from the benchmarked weights); helical runs offline from it. Prints ``BENCH_EMBED_START`` /
``BENCH_EMBED_END`` around the timed get_embeddings calls so the caller samples CPU/RSS over that part
only. After a warm-up call on the first batch, get_embeddings runs ``--repeats`` times on all cells. Writes
``embeddings`` [N, H], ``lengths`` (helical's token counts), the seconds of each phase, and per repeat
``embed_s`` (wall) and ``cpu_s`` (this process's CPU seconds, all threads: ``time.process_time``).
Imports nothing of this project (helical's venv does not have it).
"""

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--h5ad", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import anndata as ad
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from helical.models.geneformer import Geneformer, GeneformerConfig

    started = time.perf_counter()
    model = Geneformer(GeneformerConfig(model_name=args.model, device=args.device, batch_size=args.batch_size))
    loaded = time.perf_counter()
    dataset = model.process_data(ad.read_h5ad(args.h5ad), gene_names="ensembl_id")
    tokenized = time.perf_counter()
    model.get_embeddings(dataset.select(range(min(len(dataset), args.batch_size))))  # warm-up
    walls, cpus = [], []
    print("BENCH_EMBED_START", flush=True)
    for _ in range(max(args.repeats, 1)):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        embeddings = np.asarray(model.get_embeddings(dataset), dtype=np.float32)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    print("BENCH_EMBED_END", flush=True)
    np.savez(args.out, embeddings=embeddings, lengths=np.array([len(x) for x in dataset["input_ids"]]),
             load_s=loaded - started, tokenize_s=tokenized - loaded, embed_s=np.array(walls), cpu_s=np.array(cpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
