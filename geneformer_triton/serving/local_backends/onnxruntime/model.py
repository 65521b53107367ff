"""LOCAL STAND-IN for Triton's C++ ``onnxruntime`` backend (a Python-based backend).

The ``nvidia-pytriton`` wheel ships ``tritonserver`` and the python backend but not the C++
``onnxruntime`` backend. Placed at ``<backend-directory>/onnxruntime/model.py`` (next to
``<backend-directory>/python/``), this file is picked up by Triton as a *Python-based backend*
named ``onnxruntime``, so a model whose ``config.pbtxt`` says ``platform: "onnxruntime_onnx"`` (or
``backend: "onnxruntime"``) is served UNCHANGED: the same config runs on the real C++ backend in
the NGC container. ``geneformer_triton.serving.server.LocalTritonServer`` installs it. It is meant for
local development and tests, not for production serving.

What it mirrors from the real backend:

* model file ``<model dir>/<version>/<default_model_filename or model.onnx>`` (a folder of that
  name holding ``model.onnx`` also works);
* config inputs/outputs are matched by name with the ONNX graph; at load time their data types
  and ranks are checked against the graph (a mismatch fails the load, as in the real backend);
  ``reshape`` is honoured; outputs are returned with the config's data types;
* parameters ``intra_op_thread_count``, ``inter_op_thread_count``, ``execution_mode``,
  ``enable_mem_arena``, ``enable_mem_pattern``, ``memory.enable_memory_arena_shrinkage`` and
  ``optimization { graph { level } }``; KIND_GPU instances use onnxruntime's CUDA provider if
  that onnxruntime build has it (``execution_accelerators`` are ignored with a warning);
* dynamic batching: the requests of one ``execute()`` call whose non-batch shapes match are
  concatenated into one ``session.run`` and the results split back; others run separately;
* only the outputs requested by any request of a group are computed (``session.run`` output
  names); each request gets only what it asked for;
* failures become a per-request ``TritonError`` with a clear message; the stub never crashes.

Unlike the real backend, it validates Geneformer token inputs (``input_ids`` in ``[0, vocabulary)``,
``attention_mask`` 0/1 with a 1 per row, at most the manifest's ``input_size`` tokens) and answers bad
requests with INVALID_ARGUMENT / HTTP 400 (``geneformer_triton.core.validation``).

Differences: it runs in the python-backend stub process, so inputs and outputs go through shared
memory (extra copies), and there is no pinned memory, CUDA-graph or TensorRT support.
"""

from __future__ import annotations

import json
import os
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

_BACKEND = "onnxruntime (local python stand-in)"

# ONNX tensor element type strings (onnxruntime NodeArg.type) -> numpy dtype.
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _config_numpy_dtype(data_type: str) -> Any:
    """numpy dtype for a config data type such as ``TYPE_FP32`` (``TYPE_STRING`` -> object)."""
    if data_type == "TYPE_STRING":
        return np.object_
    dtype = pb_utils.triton_string_to_numpy(data_type)
    if dtype is None:
        raise ValueError(f"data type {data_type} is not supported by the local onnxruntime stand-in")
    return dtype




class TritonPythonModel:
    """Serve an ONNX model with onnxruntime, following Triton's ``onnxruntime`` backend contract."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        self.config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.config.get("name", "?"))
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        self.batching = self.max_batch_size > 0

        version = args["model_version"]
        path = model_file_path(args, self.config, "model.onnx")
        if os.path.isdir(path):
            path = os.path.join(path, "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"[{_BACKEND}] model '{self.model_name}' version {version}: model file not found: {path}"
            )

        options = ort.SessionOptions()
        self._apply_parameters(options, ort)
        providers: list[Any] = ["CPUExecutionProvider"]
        kind = args.get("model_instance_kind", "CPU")
        if kind == "GPU":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device_id = int(args.get("model_instance_device_id", "0") or 0)
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
            else:
                pb_utils.Logger.log_warn(
                    f"[{_BACKEND}] {self.model_name}: KIND_GPU instance but this onnxruntime build has "
                    "no CUDAExecutionProvider; running on CPU"
                )
        accelerators = self.config.get("optimization", {}).get("execution_accelerators", {})
        if any(accelerators.get(k) for k in ("gpu_execution_accelerator", "cpu_execution_accelerator")):
            pb_utils.Logger.log_warn(
                f"[{_BACKEND}] {self.model_name}: execution_accelerators (TensorRT/OpenVINO...) are "
                "ignored by the local stand-in"
            )
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - report any onnxruntime load error clearly
            raise pb_utils.TritonModelException(
                f"[{_BACKEND}] model '{self.model_name}': onnxruntime could not load {path}: {exc}"
            ) from exc

        self.run_options = ort.RunOptions()
        shrink = config_parameter(self.config, "memory.enable_memory_arena_shrinkage")
        if shrink:
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", shrink)

        self.inputs = self._match(self.config.get("input", []), self.session.get_inputs(), "input")
        self.outputs = self._match(self.config.get("output", []), self.session.get_outputs(), "output")
        self.output_order = [o["name"] for o in self.config.get("output", [])]
        self.token_limits = token_limits(args)
        pb_utils.Logger.log_info(
            f"[{_BACKEND}] loaded '{self.model_name}' from {path} "
            f"(providers {self.session.get_providers()}, max_batch_size {self.max_batch_size})"
        )

    # -- configuration --------------------------------------------------------------------------
    def _apply_parameters(self, options: Any, ort: Any) -> None:
        """Session options from the parameters the real onnxruntime backend understands."""
        cfg = self.config
        for key, attr in (("intra_op_thread_count", "intra_op_num_threads"),
                          ("inter_op_thread_count", "inter_op_num_threads")):
            value = config_parameter(cfg, key)
            if value:
                setattr(options, attr, int(value))
        mode = config_parameter(cfg, "execution_mode")
        if mode:
            options.execution_mode = (
                ort.ExecutionMode.ORT_PARALLEL if int(mode) == 1 else ort.ExecutionMode.ORT_SEQUENTIAL
            )
        arena = config_parameter(cfg, "enable_mem_arena")
        if arena:
            options.enable_cpu_mem_arena = truthy(arena)
        pattern = config_parameter(cfg, "enable_mem_pattern")
        if pattern:
            options.enable_mem_pattern = truthy(pattern)
        # optimization { graph { level } }: -1 basic, 1 basic+extended, 2 disabled, else all.
        level = cfg.get("optimization", {}).get("graph", {}).get("level")
        levels = {
            -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        options.graph_optimization_level = levels.get(
            int(level) if level is not None else 0, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        # One ORT log line per warning is enough inside Triton's log.
        options.log_severity_level = 3

    def _match(self, config_ios: list[dict], graph_ios: list[Any], kind: str) -> dict[str, dict]:
        """Check config ``input``/``output`` entries against the ONNX graph (name, type, rank)."""
        graph = {io.name: io for io in graph_ios}
        matched: dict[str, dict] = {}
        for io in config_ios:
            name = io["name"]
            if name not in graph:
                raise pb_utils.TritonModelException(
                    f"[{_BACKEND}] model '{self.model_name}': unexpected {kind} '{name}' in the model "
                    f"configuration; the ONNX model's {kind}s are {sorted(graph)}"
                )
            node = graph[name]
            config_dtype = _config_numpy_dtype(io["data_type"])
            graph_dtype = _ORT_TO_NUMPY.get(node.type)
            if graph_dtype is None or np.dtype(graph_dtype) != np.dtype(config_dtype):
                raise pb_utils.TritonModelException(
                    f"[{_BACKEND}] model '{self.model_name}': unexpected datatype {io['data_type']} for "
                    f"{kind} '{name}', the ONNX model has {node.type}"
                )
            dims = [int(d) for d in io.get("dims", [])]
            reshape = io.get("reshape", {}).get("shape")
            model_dims = [int(d) for d in reshape] if reshape is not None else dims
            rank = len(model_dims) + (1 if self.batching else 0)
            shape = list(node.shape) if node.shape is not None else None
            if shape is not None and len(shape) != rank:
                raise pb_utils.TritonModelException(
                    f"[{_BACKEND}] model '{self.model_name}': {kind} '{name}' has {len(shape)} dims "
                    f"{shape} in the ONNX model but the configuration implies {rank} "
                    f"(dims {dims}{', plus the batch dim' if self.batching else ''})"
                )
            if shape is not None:
                for cfg_dim, onnx_dim in zip(model_dims, shape[1:] if self.batching else shape):
                    if cfg_dim >= 0 and isinstance(onnx_dim, int) and onnx_dim >= 0 and cfg_dim != onnx_dim:
                        raise pb_utils.TritonModelException(
                            f"[{_BACKEND}] model '{self.model_name}': {kind} '{name}' dims {dims} do "
                            f"not match the ONNX model shape {shape}"
                        )
            matched[name] = {
                "dtype": config_dtype,
                "dims": dims,
                "reshape": [int(d) for d in reshape] if reshape is not None else None,
                "optional": bool(io.get("optional", False)),
            }
        return matched

    # -- execution ------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_in_groups(requests, self._read_request, self._group_key, self._run_group, self._error)

    def _group_key(self, index: int, item: tuple[dict[str, np.ndarray], list[str]]) -> Any:
        """Batchable requests group by input names, non-batch shapes and dtypes; each group is one run."""
        if not self.batching:
            return ("single", index)
        return tuple(sorted((n, a.shape[1:], a.dtype.str) for n, a in item[0].items()))

    def _error(self, exc: BaseException) -> Any:
        return error_response(pb_utils, f"[{_BACKEND}] model '{self.model_name}': ", exc)

    def _read_request(self, request: Any) -> tuple[dict[str, np.ndarray], list[str]]:
        feeds: dict[str, np.ndarray] = {}
        batch = None
        for name, spec in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if spec["optional"]:
                    continue
                raise ValueError(f"missing required input '{name}'")
            array = tensor.as_numpy()
            if self.batching:
                if array.ndim == 0:
                    raise ValueError(f"input '{name}' has no batch dimension")
                if batch is None:
                    batch = array.shape[0]
                elif array.shape[0] != batch:
                    raise ValueError(f"input '{name}' has batch size {array.shape[0]}, expected {batch}")
            if spec["reshape"] is not None:
                lead = [array.shape[0]] if self.batching else []
                array = array.reshape(lead + spec["reshape"])
            if array.dtype != np.dtype(spec["dtype"]):
                array = array.astype(spec["dtype"])
            feeds[name] = array
        check_token_inputs(feeds, self.token_limits)
        requested = list(request.requested_output_names()) or list(self.output_order)
        unknown = [n for n in requested if n not in self.outputs]
        if unknown:
            raise ValueError(f"unknown requested output(s) {unknown}; outputs are {self.output_order}")
        return feeds, requested

    def _run_group(
        self,
        items: list[tuple[dict[str, np.ndarray], list[str]] | None],
        indices: list[int],
        responses: list[Any],
    ) -> None:
        wanted: list[str] = []
        for item in items:
            assert item is not None
            for name in item[1]:
                if name not in wanted:
                    wanted.append(name)
        wanted.sort(key=self.output_order.index)
        first = items[0]
        assert first is not None
        if len(items) == 1:
            feeds = first[0]
            sizes = [next(iter(feeds.values())).shape[0]] if (self.batching and feeds) else [None]
        else:
            feeds = {name: np.concatenate([it[0][name] for it in items], axis=0) for name in first[0]}
            sizes = [next(iter(it[0].values())).shape[0] for it in items]
        results = self.session.run(wanted, feeds, self.run_options)

        offsets = np.cumsum([0] + [s or 0 for s in sizes])
        for k, (item, index) in enumerate(zip(items, indices)):
            tensors = []
            for name, value in zip(wanted, results):
                if name not in item[1]:
                    continue
                spec = self.outputs[name]
                part = value[offsets[k]:offsets[k + 1]] if len(items) > 1 else value
                if spec["reshape"] is not None:
                    lead = [part.shape[0]] if self.batching else []
                    part = part.reshape(lead + [d for d in spec["dims"]])
                part = np.ascontiguousarray(part, dtype=spec["dtype"])
                tensors.append(pb_utils.Tensor(name, part))
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.session = None
