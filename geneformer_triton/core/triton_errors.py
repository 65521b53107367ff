"""Error responses of our python-backend models: bad input -> INVALID_ARGUMENT (gRPC) / 400 (HTTP),
anything else -> INTERNAL / 500. Used by the ``model.py`` adapters and the local stand-in backends.

``pb_utils`` is the stub's ``triton_python_backend_utils`` module (only importable inside the stub,
hence passed in). Triton 2.51's python backend takes a code as ``TritonError(message, code)``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

#: Exception types that mean "the request is wrong" (the caller can fix it), not "the server failed":
#: ``validation.InputValidationError``, ``tokenizer.TokenizationError`` and ``isp_service.IspInputError``
#: are all ``ValueError``s.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError,)


def triton_error(pb_utils: ModuleType, message: str, bad_input: bool) -> Any:
    """A ``pb_utils.TritonError`` with code INVALID_ARG (``bad_input``) or INTERNAL."""
    codes = pb_utils.TritonError
    code = getattr(codes, "INVALID_ARG" if bad_input else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def error_response(pb_utils: ModuleType, prefix: str, error: BaseException,
                   bad_input: tuple[type[BaseException], ...] = BAD_INPUT_ERRORS) -> Any:
    """An ``InferenceResponse`` carrying ``error``: ``prefix`` once, then the error's message."""
    is_bad = isinstance(error, bad_input)
    message = str(error) if is_bad else f"internal error: {error!r}"
    if not message.startswith(prefix):
        message = prefix + message
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(pb_utils, message, is_bad))
