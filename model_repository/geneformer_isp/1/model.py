"""Triton python backend (BLS): in-silico perturbation of one cell per request, scores out.

Request: a cell (``gene_ids`` + raw ``counts``) and a perturbation spec, every tensor with a leading batch
dimension of 1 (``max_batch_size`` > 0 with dynamic batching and ragged inputs: Triton hands the requests
queued from any clients to one ``execute``; a request whose batch dimension is not 1 fails alone). The
model tokenizes each cell in-process (``RankValueTokenizer`` over the dictionary files of
``geneformer_tokenizer/1``, the same files and parameters the tokenizer model serves), builds every perturbed token sequence
(``geneformer_triton.core.perturbation``), sends them to an encoder model of this server through BLS in
chunks of at most ``max_tokens_per_batch`` tokens (original cell first; up to ``max_inflight_batches``
chunks in flight) and reduces each chunk's embeddings to scores right away. Only
``[perturbations]``-sized score vectors leave the server. Contract and semantics:
``geneformer_triton/core/isp_service.py``.

Config parameters: ``encoder_model`` (default encoder), ``allowed_encoder_models`` (comma list a
request's ``encoder_model`` input may choose from), ``dictionary_dir`` (relative to this model's
folder), ``model_input_size``, ``special_tokens``, ``max_tokens_per_batch``, optional
``max_inflight_batches``, ``max_perturbations_per_request``, ``encoder_signature.<model>``.

With ``semantics="upstream"`` (default) the encoder is the allowed one whose ``manifest.json``
``hidden_state_index`` equals ``n_layers + emb_layer`` (upstream's ISP layer convention), preferring one
whose signature says graph ``isp_reduced`` (``geneformer_onnx_isp_reduced``: the graph returns per-row token
means and per-gene cosines, export/isp_reduction_export.py) over one returning token embeddings (reduced
here by ``perturbation.reduce_token_rows``). The rows of every upstream V1 request of one ``execute`` call
(several cells) are packed together into encoder batches of at most ``max_tokens_per_batch`` tokens
(``perturbation.PackedRun``: each batch carries the originals its rows are compared with); requests on the
token protocol ('ours', V2 cells) run their own chunks (original first). One driver (:meth:`TritonPythonModel._drive`)
keeps up to ``max_inflight_batches`` encoder calls of all of them in flight; a request that fails (bad
input, a failing batch) fails alone.

Encoder tensor names, max_batch_size and hidden size come from this model's ``encoder_signature.<model>``
parameters (generated from ``geneformer_triton/core/contract.py``; TorchScript encoders use ``input_ids__0`` ...
``token_embeddings__1``); its
``token_embeddings`` output is requested only when the gene-embedding shift is computed. BLS outputs
are requested in CPU memory. Every bad input fails only its own request with a TritonError naming
the problem (INVALID_ARGUMENT / HTTP 400; inputs checked by ``geneformer_triton.core.validation`` first);
encoder failures are INTERNAL / 500 (their text without tracebacks or server paths:
``triton_errors.public_message``; the full text is logged); the stub never crashes.
"""

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable, Optional

import numpy as np
import triton_python_backend_utils as pb_utils

from geneformer_triton.core import contract
from geneformer_triton.core.dictionaries import DictionaryError, load_vocabulary
from geneformer_triton.core.isp_service import (
    IspEngine,
    IspInputError,
    batched,
    one_cell_inputs,
    parse_request,
    wants_gene_shift,
)
from geneformer_triton.core.isp_upstream_service import UpstreamJob
from geneformer_triton.core.perturbation import PackedBatch, PackedRun, reduce_token_rows
from geneformer_triton.core.triton_errors import error_response, public_message
from geneformer_triton.core.validation import check_rank_shift, validate_cell_inputs

LOGGER = logging.getLogger("geneformer_isp")
PREFIX = "geneformer_isp: "
READY_TTL_S = 10.0  # an encoder's readiness is asked again after this long, or after a failed call


class EncoderError(RuntimeError):
    """The encoder model failed a chunk (not ready, out of memory, bad shapes...)."""


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    input_ids: str
    attention_mask: str
    cell_embedding: str
    token_embeddings: str
    max_batch_size: Optional[int]
    hidden_size: Optional[int]
    num_hidden_layers: Optional[int] = None  # from the encoder's manifest.json (None: unknown)
    hidden_state_index: Optional[int] = None  # hidden_states index its token_embeddings are
    isp_reduction: bool = False  # the graph returns token_mean / gene_cos (export/isp_reduction_export.py)
    precision: str = "fp32"  # from the manifest


@dataclass(frozen=True)
class EncodeTask:
    """One unit of encoder work of an ``execute`` (see :meth:`TritonPythonModel._drive`): ``run`` calls the
    encoder and delivers the result to its job(s), ``live`` says whether any job it serves has not failed,
    ``fail`` fails them, ``then`` holds tasks that may start only once this one succeeded."""

    run: Callable[[], Awaitable[None]]
    live: Callable[[], bool]
    fail: Callable[[BaseException], None]
    then: tuple = ()


def _parameter(config: dict, key: str, default: Optional[str] = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None:
        raise pb_utils.TritonModelException(f"{PREFIX}config parameter {key!r} is required")
    return value


def encoder_signatures(config: dict, allowed: set) -> dict:
    """``encoder_signature.<model>`` parameters (tensor names, max batch, hidden size; generated from the contract)."""
    prefix = contract.PARAM_ENCODER_SIGNATURE
    signatures = {key[len(prefix):]: json.loads(value["string_value"])
                  for key, value in config.get("parameters", {}).items() if key.startswith(prefix)}
    missing = sorted(allowed - set(signatures))
    if missing:
        raise pb_utils.TritonModelException(
            f"{PREFIX}no {prefix}<model> parameter for allowed encoders {missing}; regenerate this config "
            "(python -m geneformer_triton.export.model_configs --write, or gftriton export)"
        )
    return signatures


def encoder_info(repository: Path, name: str, signature: dict) -> EncoderInfo:
    """Encoder ``name``: tensor names and sizes from its signature, layer facts from its ``manifest.json``."""
    manifest_path = repository / name / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return EncoderInfo(
        name=name,
        max_batch_size=int(signature["max_batch_size"]) or None,  # 0 = no batch limit
        hidden_size=int(signature["hidden_size"]),
        num_hidden_layers=manifest.get("num_hidden_layers"),
        hidden_state_index=manifest.get("hidden_state_index"),
        isp_reduction=signature.get("graph") == contract.ISP_REDUCED_GRAPH,
        precision=str(manifest.get("precision", "fp32")),
        **{key: signature.get(key, "") for key in contract.PLAIN_TENSORS.as_dict()},  # "": not an output of the graph
    )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"])  # <repository>/<this model>
        self.repository = model_dir.parent
        dictionary_dir = (model_dir / _parameter(config, "dictionary_dir", "../geneformer_tokenizer/1")).resolve()
        try:
            vocabulary = load_vocabulary(dictionary_dir)
        except DictionaryError as error:
            raise pb_utils.TritonModelException(
                f"{PREFIX}{error}; the dictionaries are written by `gftriton export` into geneformer_tokenizer/1"
            ) from error
        self.model_input_size = int(_parameter(config, contract.PARAM_INPUT_SIZE))
        self.engine = IspEngine(
            vocabulary,
            model_input_size=self.model_input_size,
            special_tokens=_parameter(config, contract.PARAM_SPECIAL_TOKENS, "false").lower() == "true",
            max_tokens_per_batch=int(_parameter(config, "max_tokens_per_batch", "32768")),
            max_batch=None,
            max_perturbations=int(_parameter(config, "max_perturbations_per_request", "16384")),
        )
        self.default_encoder = _parameter(config, contract.PARAM_ENCODER_MODEL, contract.ISP_DEFAULT_ENCODER)
        allowed = _parameter(config, contract.PARAM_ALLOWED_ENCODERS, self.default_encoder)
        self.allowed_encoders = {e.strip() for e in allowed.split(",") if e.strip()} | {self.default_encoder}
        self.signatures = encoder_signatures(config, self.allowed_encoders)
        self.max_inflight = max(1, int(_parameter(config, "max_inflight_batches", "2")))
        self.encoders = {}
        self._ready: dict[str, tuple[bool, float]] = {}  # encoder -> (ready, when asked), see _is_ready
        self.cpu_memory = (
            pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0) if hasattr(pb_utils, "PreferredMemory") else None
        )

    # ------------------------------------------------------------------ encoder calls
    def _encoder(self, name: Optional[str]) -> EncoderInfo:
        name = name or self.default_encoder
        if name not in self.allowed_encoders:
            raise IspInputError(
                f"encoder_model {name!r} is not allowed; choose one of {', '.join(sorted(self.allowed_encoders))}"
            )
        if name not in self.encoders:
            self.encoders[name] = encoder_info(self.repository, name, self.signatures[name])
        return self.encoders[name]

    def _encoder_for_layer(self, requested: Optional[str], emb_layer: int, tokens: bool = False) -> EncoderInfo:
        """The encoder serving ``hidden_states[n_layers + emb_layer]`` (upstream's ISP layer convention);
        ``tokens``: one returning token embeddings (not the reduced graph: V2 cells need the ``<cls>`` vector)."""
        names = [requested] if requested else [self.default_encoder] + sorted(self.allowed_encoders - {self.default_encoder})
        found, matching = {}, []
        for name in names:
            info = self._encoder(name)
            if info.num_hidden_layers is None or info.hidden_state_index is None:
                continue
            found[name] = info.hidden_state_index
            if not -info.num_hidden_layers <= emb_layer <= 0:
                raise IspInputError(f"emb_layer={emb_layer} is outside [-{info.num_hidden_layers}, 0] (upstream's ISP "
                                    "convention: 0 = last layer, -1 = second-to-last)")
            if info.hidden_state_index == info.num_hidden_layers + emb_layer and not (tokens and info.isp_reduction):
                matching.append(info)
        if matching:  # loaded ones first (a server may load a subset), fp32 (upstream's numbers), then the reduced
            # graph ([rows, length] values, not [rows, length, hidden])
            return sorted(matching, key=lambda info: (len(matching) > 1 and not self._is_ready(info.name),
                                                      info.precision != "fp32", not info.isp_reduction))[0]
        served = ", ".join(f"{n}: hidden_states[{i}]" for n, i in found.items()) or "none with a manifest.json"
        raise IspInputError(
            f"emb_layer={emb_layer} needs an encoder serving hidden_states[n_layers{emb_layer:+d}]; "
            f"{'encoder_model ' + repr(requested) if requested else 'the allowed encoders'} serve {served} "
            "(export one with `gftriton export --emb-layer`, or pick another emb_layer/encoder_model)"
        )

    def _is_ready(self, name: str) -> bool:
        """Whether encoder ``name`` is loaded, cached for :data:`READY_TTL_S` (asked per request otherwise)."""
        now = time.monotonic()
        cached = self._ready.get(name)
        if cached is not None and now - cached[1] < READY_TTL_S:
            return cached[0]
        try:
            ready = bool(pb_utils.is_model_ready(model_name=name))
        except Exception:  # older python backends: no readiness API; assume ready
            ready = True
        self._ready[name] = (ready, now)
        return ready

    @staticmethod
    def _numpy(tensor) -> np.ndarray:
        if tensor.is_cpu():
            return tensor.as_numpy()
        from torch.utils.dlpack import from_dlpack  # GPU tensor despite the CPU preference

        return from_dlpack(tensor.to_dlpack()).cpu().numpy()

    def _encoder_error(self, encoder: EncoderInfo, shape: tuple, response) -> EncoderError:
        self._ready.pop(encoder.name, None)  # a failed call: ask again (it may have been unloaded)
        if not self._is_ready(encoder.name):
            return EncoderError(
                f"encoder model {encoder.name!r} is not loaded on this server: load it, or send encoder_model "
                f"= one of the loaded encoders ({', '.join(sorted(self.allowed_encoders))} are allowed)"
            )
        full = response.error().message()  # may hold a TorchScript traceback with server paths: logged, not sent
        LOGGER.error("encoder model %r failed a batch of %s tokens:\n%s", encoder.name, list(shape), full)
        return EncoderError(f"encoder model {encoder.name!r} failed a batch of {list(shape)} tokens: {public_message(full)}")

    async def _encode(self, encoder: EncoderInfo, ids: np.ndarray, mask: np.ndarray, want_tokens: bool):
        outputs = [encoder.cell_embedding] + ([encoder.token_embeddings] if want_tokens else [])
        kwargs = {"preferred_memory": self.cpu_memory} if self.cpu_memory is not None else {}
        request = pb_utils.InferenceRequest(
            model_name=encoder.name,
            requested_output_names=outputs,
            inputs=[pb_utils.Tensor(encoder.input_ids, ids), pb_utils.Tensor(encoder.attention_mask, mask)],
            **kwargs,
        )
        response = await request.async_exec()
        if response.has_error():
            raise self._encoder_error(encoder, ids.shape, response)
        cell = pb_utils.get_output_tensor_by_name(response, encoder.cell_embedding)
        tokens = pb_utils.get_output_tensor_by_name(response, encoder.token_embeddings) if want_tokens else None
        if cell is None or (want_tokens and tokens is None):
            raise EncoderError(f"encoder model {encoder.name!r} returned no {outputs}")
        return self._numpy(cell), None if tokens is None else self._numpy(tokens)

    async def _encode_packed(self, encoder: EncoderInfo, batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
        """(token_mean [B, H], gene_cos [B, L]) of a packed batch, from the reduced graph or from token embeddings."""
        if not encoder.isp_reduction:
            _, tokens = await self._encode(encoder, batch.input_ids, batch.attention_mask, True)
            return reduce_token_rows(tokens, batch.attention_mask, batch.original_offset, batch.position_map)
        names = contract.ISP_REDUCED_OUTPUTS
        kwargs = {"preferred_memory": self.cpu_memory} if self.cpu_memory is not None else {}
        inputs = [pb_utils.Tensor(name, value) for name, value in zip(
            (encoder.input_ids, encoder.attention_mask, *contract.ISP_REDUCED_INPUTS),
            (batch.input_ids, batch.attention_mask, batch.original_offset, batch.position_map))]
        request = pb_utils.InferenceRequest(model_name=encoder.name, requested_output_names=list(names), inputs=inputs, **kwargs)
        response = await request.async_exec()
        if response.has_error():
            raise self._encoder_error(encoder, batch.input_ids.shape, response)
        tensors = [pb_utils.get_output_tensor_by_name(response, name) for name in names]
        if any(t is None for t in tensors):
            raise EncoderError(f"encoder model {encoder.name!r} returned no {list(names)}")
        return self._numpy(tensors[0]), self._numpy(tensors[1])

    async def _run_chunk(self, job, encoder: EncoderInfo, k: int) -> None:
        ids, mask = job.batch(k)
        cell, tokens = await self._encode(encoder, ids, mask, job.gene_shift)
        job.accumulate(k, cell, tokens)

    async def _run_chunks(self, job, encoder: EncoderInfo, chunks: range) -> None:
        for k in chunks:
            await self._run_chunk(job, encoder, k)

    def _token_task(self, job, encoder: EncoderInfo, errors: list, j: int) -> EncodeTask:
        """Job ``j`` on the token protocol ('ours', upstream V2 cells): its chunks holding the original cell(s)
        (``leading_chunks``, 1 for 'ours') in order, then the others (``then``, any order)."""
        def fail(error: BaseException) -> None:
            if errors[j] is None:
                errors[j] = error

        def live() -> bool:
            return errors[j] is None

        leading = getattr(job, "leading_chunks", 1)
        rest = tuple(EncodeTask(partial(self._run_chunk, job, encoder, k), live, fail)
                     for k in range(leading, len(job.chunks)))
        return EncodeTask(partial(self._run_chunks, job, encoder, range(leading)), live, fail, rest)

    def _packed_tasks(self, encoder: EncoderInfo, jobs: list) -> tuple[PackedRun, list]:
        """The shared batches of ``jobs`` (upstream V1 cells of several requests), one task each."""
        run = PackedRun(jobs, self.engine.max_tokens_per_batch, encoder.max_batch_size, self.engine.vocabulary.pad_id)

        async def deliver(batch: PackedBatch) -> None:
            token_mean, gene_cos = await self._encode_packed(encoder, batch)
            run.deliver(batch, token_mean, gene_cos)

        return run, [EncodeTask(partial(deliver, b), partial(run.live, b), partial(run.fail, b)) for b in run.batches]

    async def _drive(self, tasks: list) -> None:
        """Run ``tasks`` (and their ``then``, ahead of the rest once unlocked), at most ``max_inflight_batches``
        encoder calls at once; a failing task fails its jobs, a task whose jobs all failed is skipped."""
        queue, pending = deque(tasks), {}
        while queue or pending:
            while queue and len(pending) < self.max_inflight:
                task = queue.popleft()
                if task.live():
                    pending[asyncio.ensure_future(task.run())] = task
            if not pending:
                break
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                if future.exception() is not None:
                    task.fail(future.exception())
                else:
                    queue.extendleft(reversed(task.then))

    async def _encode_jobs(self, jobs: list) -> list:
        """Encode ``jobs`` ([(job, encoder)], the requests of one execute); one error or None per job."""
        errors: list = [None] * len(jobs)
        tasks, packed, runs = [], {}, []
        for j, (job, encoder) in enumerate(jobs):
            if isinstance(job, UpstreamJob) and job.packable:  # V1 upstream: packed with the other requests' rows
                packed.setdefault(encoder.name, (encoder, []))[1].append(j)
            else:
                tasks.append(self._token_task(job, encoder, errors, j))
        for encoder, members in packed.values():
            run, batch_tasks = self._packed_tasks(encoder, [jobs[j][0] for j in members])
            runs.append((members, run))
            tasks += batch_tasks
        await self._drive(tasks)
        for members, run in runs:
            for j, error in zip(members, run.errors):
                errors[j] = error
        return errors

    # ------------------------------------------------------------------ requests
    def _prepare(self, request):
        """Validate and plan one request: (job, encoder, requested output names)."""

        def wire(name: str):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        get = one_cell_inputs(wire)  # [1, ...] -> [...]; a batch dimension other than 1 fails this request
        validate_cell_inputs(get)
        parsed = parse_request(get)
        check_rank_shift(parsed.rank_shift, self.model_input_size)
        requested = list(request.requested_output_names())
        if parsed.semantics == "upstream":
            encoder = self._encoder_for_layer(parsed.encoder_model, parsed.emb_layer, tokens=self.engine.special_tokens)
            job = self.engine.prepare_upstream(parsed, max_batch=encoder.max_batch_size, hidden_size=encoder.hidden_size)
        else:
            encoder = self._encoder(parsed.encoder_model)
            job = self.engine.prepare(
                parsed, wants_gene_shift(parsed, requested), max_batch=encoder.max_batch_size, hidden_size=encoder.hidden_size
            )
        return job, encoder, requested

    @staticmethod
    def _response(job, requested: list):
        outputs = job.outputs()
        wanted = set(requested) or set(outputs)
        kept = batched({name: value for name, value in outputs.items() if name in wanted})  # [1, ...]: one cell
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in kept.items()])

    @staticmethod
    def _failure(error: BaseException):
        if isinstance(error, ValueError):  # IspInputError, InputValidationError: the request is wrong
            return error_response(pb_utils, PREFIX, error)
        if isinstance(error, EncoderError):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{PREFIX}{error}"))
        LOGGER.error("geneformer_isp failed", exc_info=error)  # never crash the stub: report and serve the rest
        return error_response(pb_utils, PREFIX, error)

    async def execute(self, requests: list) -> list:
        """One response per request (several cells when Triton's dynamic batcher merged them); each fails alone."""
        responses: list = [None] * len(requests)
        prepared = []  # (request index, job, encoder, requested outputs)
        for i, request in enumerate(requests):
            try:
                prepared.append((i, *self._prepare(request)))
            except Exception as error:  # this request fails alone
                responses[i] = self._failure(error)
        try:
            errors = await self._encode_jobs([(job, encoder) for _, job, encoder, _ in prepared])
        except Exception as error:  # planning the shared batches failed: these requests fail, the stub lives
            errors = [error] * len(prepared)
        for (i, job, _, requested), error in zip(prepared, errors):
            try:
                if error is not None:
                    raise error
                responses[i] = self._response(job, requested)
            except Exception as failure:
                responses[i] = self._failure(failure)
        return responses
