"""Triton python backend: rank-value tokenizer (raw counts -> Geneformer token ids).

Inputs per batch row (one cell): ``gene_ids`` BYTES [G] (Ensembl ids, "" = padding), ``counts`` FP32
[G], optional ``n_counts`` FP32 [1]. Outputs: ``input_ids`` INT64 [L] right-padded with the pad id to
the longest cell of the request, ``attention_mask`` INT64 [L], ``length`` INT64 [1].

Dictionaries and sizes come from the model config's parameters (files relative to this folder).
Any bad input (NaN/negative/absurd counts, bad n_counts, non-UTF-8 gene ids, shape mismatch, no
vocabulary gene, oversize request; ``geneformer_triton.core.validation``) fails only its own request with
INVALID_ARGUMENT / HTTP 400 and a message naming the tensor and the cell; the other requests of the
batch are served. Server faults are INTERNAL / 500.
Needs the ``geneformer_triton`` package importable by the python backend's stub.
"""

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from geneformer_triton.core import contract
from geneformer_triton.core.dictionaries import load_vocabulary
from geneformer_triton.core.tokenizer import RankValueTokenizer, TokenizationError, pad_token_batch
from geneformer_triton.core.triton_errors import error_response
from geneformer_triton.core.validation import validate_cell_inputs

LOGGER = logging.getLogger("geneformer_tokenizer")
PREFIX = "geneformer_tokenizer: "


def _parameter(config: dict, key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None:
        raise pb_utils.TritonModelException(f"geneformer_tokenizer: config parameter {key!r} is required")
    return value


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        files = {
            key: folder / _parameter(config, key)
            for key in ("token_dictionary", "gene_median_dictionary")
        }
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise pb_utils.TritonModelException(
                f"geneformer_tokenizer: dictionary files missing: {missing}; run `gftriton export` first"
            )
        vocabulary = load_vocabulary(folder)
        self.tokenizer = RankValueTokenizer(
            vocabulary,
            model_input_size=int(_parameter(config, contract.PARAM_INPUT_SIZE)),
            special_tokens=_parameter(config, contract.PARAM_SPECIAL_TOKENS, "false").lower() == "true",
        )
        self.pad_id = vocabulary.pad_id
        self.max_genes_per_request = int(_parameter(config, "max_genes_per_request", "1000000"))

    def _tokenize(self, request) -> "pb_utils.InferenceResponse":
        def get(name: str):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        raw_ids = get("gene_ids")
        if raw_ids is not None and raw_ids.size > self.max_genes_per_request:
            raise TokenizationError(
                f"request carries {raw_ids.size} gene entries, more than max_genes_per_request="
                f"{self.max_genes_per_request}; split it into smaller requests"
            )
        gene_ids, counts, n_counts = validate_cell_inputs(get)
        n_counts = None if n_counts is None else n_counts.reshape(-1)
        cells = self.tokenizer.tokenize_gene_lists(gene_ids, counts, n_counts)
        input_ids, attention_mask = pad_token_batch(cells, self.pad_id)
        lengths = attention_mask.sum(axis=1, keepdims=True).astype(np.int64)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("input_ids", input_ids),
                pb_utils.Tensor("attention_mask", attention_mask),
                pb_utils.Tensor("length", lengths),
            ]
        )

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._tokenize(request))
            except ValueError as error:  # TokenizationError, InputValidationError: the request is wrong
                responses.append(error_response(pb_utils, PREFIX, error))
            except Exception as error:  # never crash the stub: report and serve the next request
                LOGGER.exception("tokenizer failed")
                responses.append(error_response(pb_utils, PREFIX, error))
        return responses
