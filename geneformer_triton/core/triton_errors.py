"""Error responses of our python-backend models: bad input -> INVALID_ARGUMENT (gRPC) / 400 (HTTP),
anything else -> INTERNAL / 500. Used by the ``model.py`` adapters and the local stand-in backends.

What a client reads never carries a traceback or a server path (:func:`public_message`: a TorchScript
failure's text holds the serialized code and the exporting machine's source paths); the full text goes
to the server log.

``pb_utils`` is the stub's ``triton_python_backend_utils`` module (only importable inside the stub,
hence passed in). Triton 2.51's python backend takes a code as ``TritonError(message, code)``.
"""

from __future__ import annotations

import logging
import re
from types import ModuleType
from typing import Any

LOGGER = logging.getLogger(__name__)

#: Exception types that mean "the request is wrong" (the caller can fix it), not "the server failed":
#: ``validation.InputValidationError``, ``tokenizer.TokenizationError`` and ``isp_service.IspInputError``
#: are all ``ValueError``s.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError,)


#: where a traceback starts: Python's and TorchScript's headers, a ``File "..."`` frame, a ``path.py(LINE): fn`` frame
_TRACEBACK_LINE = re.compile(r'^\s*(Traceback\b|File "|\S+\.py\(\d+\):)')
#: the exception line that ends a traceback: ``RuntimeError: index out of range in self``
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")
#: an absolute path of two or more parts (``/opt/model/1/model.pt``); ``0/1``, ``a/b``, `` / `` are not paths
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[\w.+@-]+/)+[\w.+@-]*")


def public_message(text: str) -> str:
    """The part of an error text a client may read: without a traceback, the text itself; with one, its
    first line (what was being done) and the exception line that ends it (what failed). Absolute paths
    become ``<path>``. A plain message (no traceback, no absolute path) comes back unchanged."""
    lines = [line.strip() for line in text.strip().splitlines()]
    start = next((i for i, line in enumerate(lines) if _TRACEBACK_LINE.match(line)), None)
    if start is not None:
        head = " ".join(line for line in lines[:start] if line)
        ends = [line for line in lines[start:] if _EXCEPTION_LINE.match(line)]
        parts = [head] + ([ends[-1]] if ends and ends[-1] not in head else [])
        text = " ".join(part for part in parts if part) or "(details in the server log)"
    return _ABSOLUTE_PATH.sub("<path>", text.strip())


def triton_error(pb_utils: ModuleType, message: str, bad_input: bool) -> Any:
    """A ``pb_utils.TritonError`` with code INVALID_ARG (``bad_input``) or INTERNAL."""
    codes = pb_utils.TritonError
    code = getattr(codes, "INVALID_ARG" if bad_input else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def error_response(pb_utils: ModuleType, prefix: str, error: BaseException,
                   bad_input: tuple[type[BaseException], ...] = BAD_INPUT_ERRORS) -> Any:
    """An ``InferenceResponse`` carrying ``error``: ``prefix`` once, then the error's :func:`public_message`
    (an internal error: ``internal error: <type>: <message>``); a message cut there is logged in full."""
    is_bad = isinstance(error, bad_input)
    public = public_message(str(error))
    if public != str(error).strip():
        LOGGER.error("%s%s (the client got: %s); full text:\n%s", prefix, type(error).__name__, public, error)
    message = public if is_bad else f"internal error: {type(error).__name__}: {public}"
    if not message.startswith(prefix):
        message = prefix + message
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(pb_utils, message, is_bad))
