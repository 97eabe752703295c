"""Admission: can this miner serve this job, as asked? Checked before any work starts.

A job the miner cannot serve is failed with a code that says why; it is never run on
another model or device than the one asked for:

==============================================  ======================
problem                                         code
==============================================  ======================
payload not an object, no model, no prompt,     ``INVALID_PAYLOAD``
text that is not valid Unicode (a lone
surrogate)
a known parameter of the wrong type or range    ``INVALID_PARAMETERS``
constraints of the wrong type                   ``INVALID_PAYLOAD``
the model is not served here (payload or        ``MODEL_NOT_SERVED``
``constraints.models``)
the model is configured but not ready now       ``BACKEND_UNAVAILABLE``
only GPU memory is short                        ``INSUFFICIENT_VRAM``
any other constraint unmet                      ``CONSTRAINTS_UNMET``
==============================================  ======================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from miner.wire.errors import ErrorCode, JobError
from miner.wire.protocol import ConstraintError, parse_constraints, unmet_constraint
from runners.params import TextRequest, parse_text_payload


def admit(
    payload: Any,
    constraints: Any,
    capabilities: dict[str, Any],
    served_models: Collection[str],
    region: str | None = None,
    configured_models: Collection[str] = (),
) -> TextRequest:
    """The parsed request when this miner can serve the job; otherwise raise :class:`JobError`.

    ``served_models`` are the models ready now; ``configured_models`` may name more that
    are configured but not ready (an engine restarting).
    """
    request = parse_text_payload(payload)
    _check_unicode(request)
    if request.model not in served_models and request.model in configured_models:
        raise JobError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"model {request.model!r} is configured on this miner but not ready right now",
        )
    if request.model not in served_models:
        serves = ", ".join(sorted(served_models)) or "nothing yet"
        raise JobError(
            ErrorCode.MODEL_NOT_SERVED, f"model {request.model!r} is not served by this miner (it serves {serves})"
        )
    try:
        parsed = parse_constraints(constraints)
    except ConstraintError as exc:
        raise JobError(ErrorCode.INVALID_PAYLOAD, str(exc)) from exc
    missing = [m for m in parsed.models if m not in served_models]
    if missing:
        raise JobError(ErrorCode.MODEL_NOT_SERVED, f"constraints.models asks for {missing}, not served by this miner")
    why = unmet_constraint(parsed, capabilities, region)
    if why is None:
        return request
    if (
        parsed.min_vram_gb
        and unmet_constraint(dataclasses.replace(parsed, min_vram_gb=None), capabilities, region) is None
    ):
        raise JobError(ErrorCode.INSUFFICIENT_VRAM, why)
    raise JobError(ErrorCode.CONSTRAINTS_UNMET, why)


def _check_unicode(request: TextRequest) -> None:
    """Every text must encode as UTF-8 (JSON can carry lone surrogates; no runner can use them)."""
    texts: list[tuple[str, str]] = []  # the model name is only compared: a bad one is MODEL_NOT_SERVED
    if request.prompt is not None:
        texts.append(("payload.prompt", request.prompt))
    for i, message in enumerate(request.messages or ()):
        texts.append((f"payload.messages[{i}].content", message["content"]))
    texts.extend((f"payload.parameters.stop[{i}]", s) for i, s in enumerate(request.params.stop))
    for field, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise JobError(
                ErrorCode.INVALID_PAYLOAD,
                f"{field}: contains an unpaired surrogate at position {exc.start}; send valid Unicode",
            ) from exc

