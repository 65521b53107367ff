"""LOCAL STAND-IN for Triton's C++ ``pytorch`` (libtorch) backend (a Python-based backend).

The ``nvidia-pytriton`` wheel ships ``tritonserver`` and the python backend but not the C++
``pytorch`` backend. Placed at ``<backend-directory>/pytorch/model.py`` (next to
``<backend-directory>/python/``), this file is picked up by Triton as a *Python-based backend*
named ``pytorch``, so a model whose ``config.pbtxt`` says ``platform: "pytorch_libtorch"`` (or
``backend: "pytorch"``) is served UNCHANGED: the same config runs on the real libtorch backend in
the NGC container. ``geneformer_triton.serving.server.LocalTritonServer`` installs it. It is meant for
local development and tests, not for production serving.

What it mirrors from the real backend:

* a TorchScript file ``<model dir>/<version>/<default_model_filename or model.pt>`` loaded with
  ``torch.jit.load``;
* tensor naming: ``<name>__<index>`` inputs are passed to ``forward()`` by index and
  ``<name>__<index>`` outputs are taken by index from the returned tuple (a single returned
  tensor is index 0); inputs named like ``forward()``'s arguments are passed by that position;
  otherwise config order is used;
* outputs must come back with the config's data types: a mismatch is a per-request error (the
  real backend rejects it too), so a model that works here also works in the NGC container;
* parameters ``INFERENCE_MODE`` (default true), ``DISABLE_OPTIMIZED_EXECUTION``,
  ``INTRA_OP_THREAD_COUNT``, ``INTER_OP_THREAD_COUNT``, ``ENABLE_JIT_PROFILING``,
  ``ENABLE_JIT_EXECUTOR``, ``DISABLE_CUDNN``; KIND_GPU instances run on ``cuda:<device id>``;
* dynamic batching: the requests of one ``execute()`` call whose non-batch shapes match are
  concatenated into one ``forward()`` and the results split back; others run separately;
* failures become a per-request ``TritonError`` with a clear message; the stub never crashes.

Unlike the real backend, it validates Geneformer token inputs (``input_ids__0`` in ``[0, vocabulary)``,
``attention_mask__1`` 0/1 with a 1 per row, at most the manifest's ``input_size`` tokens) and answers
bad requests with INVALID_ARGUMENT / HTTP 400 (``geneformer_triton.core.validation``).

Differences: TorchScript computes every output (only the requested ones are returned); it runs in
the python-backend stub process, so tensors go through shared memory (extra copies).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from geneformer_triton.core.triton_errors import error_response
from geneformer_triton.serving.stand_in_backend import (
    check_token_inputs,
    config_parameter,
    execute_in_groups,
    model_file_path,
    token_limits,
    truthy,
)

_BACKEND = "pytorch (local python stand-in)"
_INDEXED = re.compile(r"^(.*)__(\d+)$")




def _config_numpy_dtype(data_type: str) -> Any:
    if data_type == "TYPE_STRING":
        raise ValueError("TYPE_STRING tensors are not supported by the libtorch backend")
    if data_type == "TYPE_BF16":
        raise ValueError("TYPE_BF16 tensors are not supported by the local pytorch stand-in")
    dtype = pb_utils.triton_string_to_numpy(data_type)
    if dtype is None:
        raise ValueError(f"data type {data_type} is not supported by the local pytorch stand-in")
    return dtype


def _order(names: list[str], what: str, model_name: str, arg_names: list[str] | None) -> list[str]:
    """Order config tensor names as the model sees them (``__<index>``, forward() args, config)."""
    indexed = [_INDEXED.match(n) for n in names]
    if names and all(indexed):
        by_index: dict[int, str] = {}
        for name, match in zip(names, indexed):
            assert match is not None
            idx = int(match.group(2))
            if idx in by_index:
                raise ValueError(f"{what}s '{by_index[idx]}' and '{name}' have the same index {idx}")
            by_index[idx] = name
        if sorted(by_index) != list(range(len(names))) and what == "input":
            raise ValueError(
                f"{what} indices {sorted(by_index)} of model '{model_name}' must be 0..{len(names) - 1}"
            )
        return [by_index[i] for i in sorted(by_index)]
    if arg_names and set(names) <= set(arg_names):
        return sorted(names, key=arg_names.index)
    return list(names)


class TritonPythonModel:
    """Serve a TorchScript model with torch, following Triton's ``pytorch`` backend contract."""

    def initialize(self, args: dict[str, str]) -> None:
        import torch

        self.torch = torch
        self.config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.config.get("name", "?"))
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        self.batching = self.max_batch_size > 0

        version = args["model_version"]
        path = model_file_path(args, self.config, "model.pt")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"[{_BACKEND}] model '{self.model_name}' version {version}: model file not found: {path}"
            )

        self._apply_parameters(torch)
        kind = args.get("model_instance_kind", "CPU")
        if kind == "GPU":
            if not torch.cuda.is_available():
                raise pb_utils.TritonModelException(
                    f"[{_BACKEND}] model '{self.model_name}': KIND_GPU instance but torch sees no CUDA device"
                )
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', '0') or 0)}")
        else:
            self.device = torch.device("cpu")

        try:
            self.model = torch.jit.load(path, map_location=self.device)
        except Exception as exc:  # noqa: BLE001
            raise pb_utils.TritonModelException(
                f"[{_BACKEND}] model '{self.model_name}': torch.jit.load could not load {path} "
                f"(the libtorch backend needs a TorchScript file): {exc}"
            ) from exc
        self.model.eval()

        arg_names: list[str] | None = None
        try:
            arg_names = [a.name for a in self.model.forward.schema.arguments][1:]  # drop self
        except Exception:  # noqa: BLE001 - schema is optional information
            arg_names = None

        try:
            self.inputs = {io["name"]: io for io in self.config.get("input", [])}
            self.input_order = _order(list(self.inputs), "input", self.model_name, arg_names)
            for io in self.inputs.values():
                io["_dtype"] = _config_numpy_dtype(io["data_type"])
            outputs = self.config.get("output", [])
            self.outputs = {io["name"]: io for io in outputs}
            for io in self.outputs.values():
                io["_dtype"] = _config_numpy_dtype(io["data_type"])
            names = [io["name"] for io in outputs]
            if names and all(_INDEXED.match(n) for n in names):
                self.output_index = {n: int(_INDEXED.match(n).group(2)) for n in names}  # type: ignore[union-attr]
            else:
                self.output_index = {n: i for i, n in enumerate(names)}
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"[{_BACKEND}] model '{self.model_name}': {exc}") from exc
        if arg_names is not None and len(arg_names) < len(self.input_order):
            raise pb_utils.TritonModelException(
                f"[{_BACKEND}] model '{self.model_name}': the configuration has {len(self.input_order)} "
                f"inputs but forward() takes {len(arg_names)} ({arg_names})"
            )
        self.token_limits = token_limits(args)
        pb_utils.Logger.log_info(
            f"[{_BACKEND}] loaded '{self.model_name}' from {path} on {self.device} "
            f"(inputs {self.input_order}, max_batch_size {self.max_batch_size})"
        )

    def _apply_parameters(self, torch: Any) -> None:
        cfg = self.config
        value = config_parameter(cfg, "INFERENCE_MODE")
        self.inference_mode = truthy(value) if value else True
        value = config_parameter(cfg, "DISABLE_OPTIMIZED_EXECUTION")
        if value and truthy(value):
            torch._C._set_graph_executor_optimize(False)
        value = config_parameter(cfg, "INTRA_OP_THREAD_COUNT")
        if value and int(value) > 0:
            torch.set_num_threads(int(value))
        value = config_parameter(cfg, "INTER_OP_THREAD_COUNT")
        if value and int(value) > 0:
            try:
                torch.set_num_interop_threads(int(value))
            except RuntimeError as exc:  # already started: keep the default, say so
                pb_utils.Logger.log_warn(f"[{_BACKEND}] INTER_OP_THREAD_COUNT ignored: {exc}")
        # libtorch's getExecutorMode() / getProfilingMode(), where this torch still has them.
        for key, setter in (("ENABLE_JIT_EXECUTOR", "_jit_set_profiling_executor"),
                            ("ENABLE_JIT_PROFILING", "_jit_set_profiling_mode")):
            value = config_parameter(cfg, key)
            if value and hasattr(torch._C, setter):
                getattr(torch._C, setter)(truthy(value))
        value = config_parameter(cfg, "DISABLE_CUDNN")
        if value:
            torch.backends.cudnn.enabled = not truthy(value)

    # -- execution ------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_in_groups(requests, self._read_request, self._group_key, self._run_group, self._error)

    def _group_key(self, index: int, item: tuple[list[np.ndarray], list[str]]) -> Any:
        """Batchable requests group by non-batch shapes and dtypes; each group is one forward()."""
        if not self.batching:
            return ("single", index)
        return tuple((a.shape[1:], a.dtype.str) for a in item[0])

    def _error(self, exc: BaseException) -> Any:
        return error_response(pb_utils, f"[{_BACKEND}] model '{self.model_name}': ", exc)

    def _read_request(self, request: Any) -> tuple[list[np.ndarray], list[str]]:
        arrays: list[np.ndarray] = []
        batch = None
        for name in self.input_order:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input '{name}' (the libtorch backend has no optional inputs)")
            array = tensor.as_numpy()
            if self.batching:
                if array.ndim == 0:
                    raise ValueError(f"input '{name}' has no batch dimension")
                if batch is None:
                    batch = array.shape[0]
                elif array.shape[0] != batch:
                    raise ValueError(f"input '{name}' has batch size {array.shape[0]}, expected {batch}")
            arrays.append(array)
        check_token_inputs(dict(zip(self.input_order, arrays)), self.token_limits)
        requested = list(request.requested_output_names()) or list(self.outputs)
        unknown = [n for n in requested if n not in self.outputs]
        if unknown:
            raise ValueError(f"unknown requested output(s) {unknown}; outputs are {list(self.outputs)}")
        return arrays, requested

    def _forward(self, arrays: list[np.ndarray]) -> list[Any]:
        torch = self.torch
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]
        context = torch.inference_mode() if self.inference_mode else torch.no_grad()
        with context:
            result = self.model(*tensors)
        if isinstance(result, torch.Tensor):
            return [result]
        if isinstance(result, (tuple, list)):
            return list(result)
        if isinstance(result, dict):
            raise TypeError("forward() returned a dict; the libtorch backend expects a tensor or a tuple")
        raise TypeError(f"forward() returned {type(result).__name__}; expected a tensor or a tuple")

    def _run_group(
        self,
        items: list[tuple[list[np.ndarray], list[str]] | None],
        indices: list[int],
        responses: list[Any],
    ) -> None:
        first = items[0]
        assert first is not None
        if len(items) == 1:
            arrays = first[0]
        else:
            arrays = [np.concatenate([it[0][k] for it in items], axis=0) for k in range(len(first[0]))]  # type: ignore[index]
        sizes = [it[0][0].shape[0] if (self.batching and it[0]) else 0 for it in items]  # type: ignore[index]
        results = self._forward(arrays)

        wanted = {n for it in items for n in it[1]}  # type: ignore[union-attr]
        converted: dict[str, np.ndarray] = {}
        for name in wanted:
            index = self.output_index[name]
            if index >= len(results):
                raise IndexError(
                    f"output '{name}' is index {index} but forward() returned {len(results)} tensor(s)"
                )
            value = results[index]
            if not isinstance(value, self.torch.Tensor):
                raise TypeError(f"output '{name}' (index {index}) is a {type(value).__name__}, not a tensor")
            array = value.detach().cpu().numpy()
            expected = np.dtype(self.outputs[name]["_dtype"])
            if array.dtype != expected:
                raise TypeError(
                    f"unexpected datatype {array.dtype} for output '{name}', the configuration says "
                    f"{self.outputs[name]['data_type']}"
                )
            converted[name] = array

        offsets = np.cumsum([0] + sizes)
        for k, (item, index) in enumerate(zip(items, indices)):
            assert item is not None
            tensors = []
            for name in item[1]:
                value = converted[name]
                part = value[offsets[k]:offsets[k + 1]] if len(items) > 1 else value
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part)))
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.model = None
