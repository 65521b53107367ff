"""Helpers shared by the local stand-in backends (``local_backends/*/model.py``).

Config parameters, the model file's location, input validation of the Geneformer encoders' token
inputs (``check_token_inputs``), error responses with the right code, and request handling: one
``execute()`` call receives several requests (dynamic batching). Requests are parsed one by one
(a bad one gets its own error), grouped by a key (e.g. input names and non-batch shapes), and each
group runs as one batch; if a group fails, its requests are retried one at a time so a single bad
request does not fail its neighbours.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from geneformer_triton.core.contract import BACKENDS
from geneformer_triton.core.validation import check_token_batch

#: (input_ids, attention_mask) wire names of the Geneformer encoders (ONNX, TorchScript ``__<index>``).
TOKEN_INPUT_NAMES = tuple(dict.fromkeys(b.tensors.inputs for b in BACKENDS.values()))


def config_parameter(config: dict, key: str) -> str | None:
    """A ``parameters { key: ... value: { string_value: ... } }`` entry of a model config, stripped."""
    value = config.get("parameters", {}).get(key)
    if value is None:
        return None
    return str(value.get("string_value", "")).strip()


def truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def model_file_path(args: dict[str, str], config: dict, default_filename: str) -> str:
    """``<model folder>/<version>/<default_model_filename or default_filename>`` of a python-backend
    ``initialize`` call (``args["model_repository"]`` is the model's own folder)."""
    filename = config.get("default_model_filename") or default_filename
    return os.path.join(args["model_repository"], args["model_version"], filename)


@dataclass(frozen=True)
class TokenLimits:
    """Limits of an encoder's token inputs, from the exporter's ``manifest.json`` (``None``: unknown)."""

    vocab_size: Optional[int] = None
    max_length: Optional[int] = None


def token_limits(args: dict[str, str]) -> TokenLimits:
    """``vocabulary_size`` and ``input_size`` of ``<model>/<version>/manifest.json`` where present."""
    path = os.path.join(args["model_repository"], args["model_version"], "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return TokenLimits()
    vocab, size = manifest.get("vocabulary_size"), manifest.get("input_size")
    return TokenLimits(int(vocab) if vocab else None, int(size) if size else None)


def check_token_inputs(arrays: Mapping[str, np.ndarray], limits: TokenLimits) -> None:
    """Validate Geneformer token inputs found among ``arrays`` (by wire name); other models pass."""
    for names in TOKEN_INPUT_NAMES:
        if all(name in arrays for name in names):
            check_token_batch(arrays[names[0]], arrays[names[1]], limits.vocab_size, limits.max_length, names)


def execute_in_groups(
    requests: Sequence[Any],
    read: Callable[[Any], Any],
    group_key: Callable[[int, Any], Hashable],
    run: Callable[[list[Any], list[int], list[Any]], None],
    error: Callable[[BaseException], Any],
) -> list[Any]:
    """Responses for ``requests``: ``run(items, indices, responses)`` fills ``responses[indices]``."""
    responses: list[Any] = [None] * len(requests)
    parsed: list[Any] = []
    for index, request in enumerate(requests):
        try:
            parsed.append(read(request))
        except Exception as exc:  # noqa: BLE001 - becomes this request's error response
            parsed.append(None)
            responses[index] = error(exc)
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(parsed):
        if item is not None:
            groups.setdefault(group_key(index, item), []).append(index)
    for members in groups.values():
        try:
            run([parsed[i] for i in members], members, responses)
        except Exception as exc:  # noqa: BLE001
            if len(members) == 1:
                responses[members[0]] = error(exc)
                continue
            for index in members:
                try:
                    run([parsed[index]], [index], responses)
                except Exception as exc_one:  # noqa: BLE001
                    responses[index] = error(exc_one)
    return responses
