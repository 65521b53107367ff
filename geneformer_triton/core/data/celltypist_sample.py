"""The celltypist sample: 559 real cells x 32,786 genes, raw counts, gene symbols (no labels).

It ships inside the ``celltypist==1.7.1`` wheel on PyPI, with ``GENCODEv44_Gene_id2name.csv``
(Ensembl id -> symbol) used to map symbols when no Geneformer ``gene_name_id_dict`` is given. The wheel
is fetched with ``pip download`` (no install) and the two files are unpacked into a cache folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import anndata as ad
import pandas as pd

from geneformer_triton.core.cell_inputs import InputOptions, SymbolMap, read_cells

LOGGER = logging.getLogger(__name__)

CELLTYPIST_WHEEL = "celltypist==1.7.1"
SAMPLE_MEMBER = "celltypist/data/samples/sample_cell_by_gene.csv"
GENCODE_MEMBER = "celltypist/data/samples/GENCODEv44_Gene_id2name.csv"


def data_cache_dir() -> Path:
    """Folder for downloaded data: ``$GFTRITON_DATA_DIR`` or ``~/.cache/geneformer_triton``."""
    return Path(os.environ.get("GFTRITON_DATA_DIR", Path.home() / ".cache" / "geneformer_triton"))


def fetch_celltypist_files(cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Download (once) the celltypist wheel and unpack the sample CSV and the GENCODE table."""
    folder = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    sample, gencode = folder / "sample_cell_by_gene.csv", folder / "GENCODEv44_Gene_id2name.csv"
    if sample.is_file() and gencode.is_file():
        return sample, gencode
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        LOGGER.info("downloading %s from PyPI (data files only)", CELLTYPIST_WHEEL)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", CELLTYPIST_WHEEL, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("celltypist-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {CELLTYPIST_WHEEL}: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, target in ((SAMPLE_MEMBER, sample), (GENCODE_MEMBER, gencode)):
                target.write_bytes(wheel.read(member))
    return sample, gencode


def load_gencode_symbol_map(gencode_csv: Path) -> dict[str, str]:
    """Symbol -> Ensembl id from GENCODE v44 (first id wins for symbols carried by several ids)."""
    table = pd.read_csv(gencode_csv, header=None, names=["ensembl_id", "symbol"])
    table = table.dropna().drop_duplicates("symbol", keep="first")
    return dict(zip(table["symbol"], table["ensembl_id"]))


def load_celltypist_sample(
    n_cells: int | None = None,
    symbol_to_ensembl: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> ad.AnnData:
    """The celltypist sample as AnnData: X float32 CSR raw counts [cells, genes], ``var_names`` symbols,
    ``var["ensembl_id"]`` (unique; "" where unmapped or a duplicate), ``obs["n_counts"]`` totals; read
    by the input layer (:func:`geneformer_triton.core.cell_inputs.read_cells`), as a user's CSV would be.

    ``symbol_to_ensembl`` defaults to GENCODE v44; pass Geneformer's ``gene_name_id_dict`` to use it.
    """
    sample_csv, gencode_csv = fetch_celltypist_files(cache_dir)
    if symbol_to_ensembl is not None:
        symbols = SymbolMap(symbol_to_ensembl, "the given gene_name_id_dict")
    else:
        symbols = SymbolMap(load_gencode_symbol_map(gencode_csv), f"GENCODE v44 ({gencode_csv.name})")
    adata = read_cells(sample_csv, InputOptions(max_cells=n_cells), symbols).to_anndata()
    LOGGER.info("celltypist sample: %d cells x %d genes, %d mapped to Ensembl ids", *adata.shape,
                int((adata.var["ensembl_id"] != "").sum()))
    return adata
