"""Geneformer gene dictionaries: token ids, non-zero medians, id collapsing and symbol mapping.

File layout is the one of the Geneformer repository and of helical's cache (JSON):
``token_dictionary.json`` (Ensembl id -> token id, with ``<pad>``, ``<mask>`` and for V2 ``<cls>``,
``<eos>``), ``gene_median_dictionary.json`` (Ensembl id -> non-zero median of counts normalized to
10,000 per cell), optional ``ensembl_mapping_dict.json`` (id or alias -> collapsed Ensembl id) and
optional ``gene_name_id_dict.json`` (gene symbol -> Ensembl id).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

LOGGER = logging.getLogger(__name__)

TOKEN_DICTIONARY_FILE = "token_dictionary.json"
GENE_MEDIAN_FILE = "gene_median_dictionary.json"
GENE_MAPPING_FILE = "ensembl_mapping_dict.json"
GENE_NAME_ID_FILE = "gene_name_id_dict.json"

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN)


class DictionaryError(ValueError):
    """A gene dictionary is missing or inconsistent."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DictionaryError(f"gene dictionary file not found: {path}")
    with path.open() as handle:
        return json.load(handle)


@dataclass
class GeneVocabulary:
    """Gene dictionaries of one Geneformer model family (V1 or V2).

    ``token_ids`` maps Ensembl ids and special tokens to int token ids; ``gene_medians`` maps Ensembl
    ids to float non-zero medians; ``gene_mapping`` collapses ids/aliases onto vocabulary ids
    (restricted, as in helical, to targets that are in the vocabulary); ``gene_name_to_id`` maps
    gene symbols to Ensembl ids.
    """

    token_ids: dict[str, int]
    gene_medians: dict[str, float]
    gene_mapping: dict[str, str] | None = None
    gene_name_to_id: dict[str, str] | None = None
    _id_to_token: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if PAD_TOKEN not in self.token_ids:
            raise DictionaryError("token dictionary has no '<pad>' entry")
        missing = [g for g in self.token_ids if g not in SPECIAL_TOKENS and g not in self.gene_medians]
        if missing:
            raise DictionaryError(
                f"{len(missing)} vocabulary genes have no median (e.g. {missing[:3]}); "
                "token and median dictionaries do not belong together"
            )
        if self.gene_mapping is not None:
            self.gene_mapping = {k: v for k, v in self.gene_mapping.items() if v in self.token_ids}
        self._id_to_token = {v: k for k, v in self.token_ids.items()}

    @property
    def pad_id(self) -> int:
        return self.token_ids[PAD_TOKEN]

    @property
    def cls_id(self) -> int | None:
        return self.token_ids.get(CLS_TOKEN)

    @property
    def eos_id(self) -> int | None:
        return self.token_ids.get(EOS_TOKEN)

    @property
    def has_special_tokens(self) -> bool:
        return CLS_TOKEN in self.token_ids and EOS_TOKEN in self.token_ids

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids of ``<cls>``/``<eos>`` present in this vocabulary (excluded from mean pooling)."""
        return tuple(self.token_ids[t] for t in (CLS_TOKEN, EOS_TOKEN) if t in self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def gene_for_token(self, token_id: int) -> str:
        return self._id_to_token[int(token_id)]

    def genes_for_tokens(self, token_ids: np.ndarray) -> list[str]:
        return [self._id_to_token[int(t)] for t in token_ids]

    def symbols_to_ensembl(self, symbols: list[str] | pd.Index) -> list[str]:
        """Map gene symbols to Ensembl ids; ids already Ensembl pass through, unknown -> ""."""
        name_map = self.gene_name_to_id or {}
        out = []
        for symbol in symbols:
            symbol = str(symbol)
            if symbol.upper().startswith("ENSG"):
                out.append(symbol.split(".")[0].upper())
            else:
                out.append(name_map.get(symbol, ""))
        return out

    def save(self, directory: str | Path) -> list[Path]:
        """Write the dictionaries as JSON files into ``directory``; returns the written paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {TOKEN_DICTIONARY_FILE: self.token_ids, GENE_MEDIAN_FILE: self.gene_medians}
        if self.gene_mapping is not None:
            files[GENE_MAPPING_FILE] = self.gene_mapping
        if self.gene_name_to_id is not None:
            files[GENE_NAME_ID_FILE] = self.gene_name_to_id
        written = []
        for name, content in files.items():
            path = directory / name
            path.write_text(json.dumps(content))
            written.append(path)
        return written


def load_vocabulary(directory: str | Path) -> GeneVocabulary:
    """Load Geneformer dictionaries from a folder (Geneformer repository or helical cache layout)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DictionaryError(f"gene dictionary folder not found: {directory}")
    mapping_path = directory / GENE_MAPPING_FILE
    names_path = directory / GENE_NAME_ID_FILE
    return GeneVocabulary(
        token_ids=_read_json(directory / TOKEN_DICTIONARY_FILE),
        gene_medians=_read_json(directory / GENE_MEDIAN_FILE),
        gene_mapping=_read_json(mapping_path) if mapping_path.is_file() else None,
        gene_name_to_id=_read_json(names_path) if names_path.is_file() else None,
    )


def build_vocabulary_from_counts(
    counts: sp.spmatrix | np.ndarray,
    gene_ids: list[str] | pd.Index,
    special_tokens: bool = False,
    target_sum: float = 10_000.0,
    min_cells: int = 1,
) -> GeneVocabulary:
    """Build token and non-zero-median dictionaries from raw counts (a custom gene panel).

    ``counts`` is [n_cells, n_genes] raw counts; each cell is normalized to ``target_sum`` total counts
    and a gene's median is taken over the cells where it is non-zero, as Geneformer's corpus medians
    are. Genes detected in fewer than ``min_cells`` cells are left out. Token ids follow Geneformer's
    layout: ``<pad>``=0, ``<mask>``=1, (``<cls>``=2, ``<eos>``=3 with ``special_tokens``), then genes
    in sorted id order.
    """
    matrix = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    if np.any(totals <= 0):
        LOGGER.warning("%d cells have no counts and are ignored for medians", int(np.sum(totals <= 0)))
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    normalized = sp.csc_matrix(sp.diags(scale) @ matrix)
    medians: dict[str, float] = {}
    for column, gene in enumerate(gene_ids):
        values = normalized.data[normalized.indptr[column] : normalized.indptr[column + 1]]
        values = values[values > 0]
        if len(values) >= min_cells and gene:
            medians[str(gene)] = float(np.median(values))
    specials = [PAD_TOKEN, MASK_TOKEN] + ([CLS_TOKEN, EOS_TOKEN] if special_tokens else [])
    token_ids = {token: index for index, token in enumerate(specials)}
    for gene in sorted(medians):
        token_ids[gene] = len(token_ids)
    LOGGER.info("built a vocabulary of %d genes from %d cells", len(medians), matrix.shape[0])
    return GeneVocabulary(token_ids=token_ids, gene_medians=medians)
