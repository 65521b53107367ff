"""The demo's in-silico perturbation plan (``geneformer_triton.cli.demo.isp_plan``): the shortest cells, genes
every one of them expresses, best ranked first. The served run itself: tests/test_readme.py (gftriton demo)."""

from __future__ import annotations

import numpy as np

from geneformer_triton.cli.demo import DemoIsp, isp_plan


def test_plan_takes_the_shortest_cells_and_genes_they_all_express(celltypist_cells, celltypist_tokens, loaded_model):
    plan = isp_plan(celltypist_cells, loaded_model, DemoIsp(cells=3, genes=8))
    lengths = sorted(len(t) for t in celltypist_tokens)
    assert plan.tokens == lengths[:3] == [len(celltypist_tokens[row]) for row in plan.rows]
    vocabulary = loaded_model.vocabulary
    token_of = {gene: vocabulary.token_ids[gene] for gene in plan.genes}
    assert len(plan.genes) == 8 == len(set(plan.genes))
    ranks = {gene: [int(np.flatnonzero(celltypist_tokens[row] == token_of[gene])[0]) for row in plan.rows]
             for gene in plan.genes}  # raises IndexError if a cell lacks the gene
    means = [np.mean(ranks[gene]) for gene in plan.genes]
    assert means == sorted(means)
    others = set(celltypist_tokens[plan.rows[0]].tolist()) - set(token_of.values())
    shared = [t for t in others if all(t in set(celltypist_tokens[row].tolist()) for row in plan.rows)]
    best_left = min(np.mean([int(np.flatnonzero(celltypist_tokens[row] == t)[0]) for row in plan.rows]) for t in shared)
    assert best_left >= means[-1]  # no shared gene left out ranks better than the last one taken


def test_plan_is_bounded_by_what_the_cells_share(celltypist_cells, loaded_model):
    plan = isp_plan(celltypist_cells, loaded_model, DemoIsp(cells=48, genes=10_000))
    assert 0 < len(plan.genes) < 10_000 and len(plan.rows) == 48
