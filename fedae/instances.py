"""The scoring service's request body: JSON bytes in, one checked float32 array out.

Every refusal is a ``RequestError`` with an HTTP status, a short machine-readable code and a message that
names the problem: which instance, which feature, what was expected and what came. Two forms are read:

- ``{"instances": [[...], ...]}``: each instance an array of the bundle's raw example shape (a table's
  row in the schema's feature order, or an image as nested arrays);
- ``{"instances": [{"feature_name": value, ...}, ...]}``: records keyed by feature name (tables only),
  in any key order; a missing or unknown name is refused, naming it.

Why checked by hand rather than with a pydantic request model: the example shape is only known once a
bundle is loaded, an image is an arbitrarily nested array, and pydantic's errors for a union of the two
forms report every branch's failures at once, which names the problem less clearly than one message
per request. NumPy's own conversion would accept what must be refused (``True`` as 1.0, ``"1.5"`` as
1.5), so types are checked before it runs.

JSON has no NaN or Infinity, but Python's json module (and many clients) write and read ``NaN``,
``Infinity`` and ``-Infinity``; here those tokens parse to a marker that is refused by name, and a
number too large for float32 (``1e39``, or ``1e400``, which Python reads as infinity) is refused too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from shared.input_schema import InputSchema

# The service's default limits (``fedae serve --max-instances / --max-body-bytes``), here because the CLI
# reads them without importing the service's web stack.
DEFAULT_MAX_INSTANCES = 1024  # shared.models.reconstruct's chunk: a full request is still one model call
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # 1,024 fleet records keyed by name are about 7 MB of JSON
DEFAULT_DRIFT_WINDOW = 1000  # shared.drift.DEFAULT_WINDOW (not imported: SciPy; a test checks they agree)
FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset({float, int})  # exact types: bool is a subclass of int and is refused
_NAMED_AT_MOST = 5  # missing or unknown feature names listed in one message


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx), ``code`` (stable, for clients) and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class NonFinite:
    """A ``NaN``, ``Infinity`` or ``-Infinity`` token of the body, kept so that it is refused by name."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object; a key given twice is refused (json.loads would keep the last value silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RequestError(422, "duplicate_key", f"key {key!r} appears twice in one JSON object")
            seen.add(key)
    return obj


def parse_json(body: bytes) -> Any:
    """The body as JSON (400 when it is not JSON), with NaN/Infinity tokens kept as ``NonFinite``."""
    if not body.strip():
        raise RequestError(400, "malformed_json", 'the body is empty; send {"instances": [...]}')
    try:
        return json.loads(body, parse_constant=NonFinite, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise RequestError(
            400, "malformed_json", f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from err
    except UnicodeDecodeError as err:
        raise RequestError(400, "malformed_json", f"the body is not UTF-8 text: {err.reason}") from err
    except RecursionError as err:
        raise RequestError(400, "malformed_json", "the JSON is nested too deeply") from err
    except ValueError as err:  # e.g. an integer of more digits than Python converts (sys.int_info)
        raise RequestError(400, "malformed_json", f"unreadable JSON: {err}") from err


def instances_array(payload: Any, schema: InputSchema, max_instances: int) -> np.ndarray:
    """The instances of a parsed body as a ``[rows, *schema.shape]`` float32 array, or a RequestError."""
    instances = _instance_list(payload, max_instances)
    if type(instances[0]) is dict:
        leaves = _record_rows(instances, schema)
    else:
        leaves = [leaf for index, item in enumerate(instances) for leaf in _array_leaves(item, schema, index)]
    return _to_float32(leaves, len(instances), schema)


def _instance_list(payload: Any, max_instances: int) -> list[Any]:
    if type(payload) is not dict:
        raise RequestError(
            422,
            "invalid_request",
            f'the body must be a JSON object {{"instances": [...]}}, got {_what(payload)}',
        )
    unknown = sorted(set(payload) - {"instances"})
    if unknown:
        raise RequestError(
            422,
            "invalid_request",
            f"unknown key(s) {', '.join(map(repr, unknown))}; expected only 'instances'",
        )
    if "instances" not in payload:
        raise RequestError(422, "invalid_request", "the body has no 'instances' key")
    instances = payload["instances"]
    if type(instances) is not list:
        raise RequestError(422, "invalid_request", f"'instances' must be a list, got {_what(instances)}")
    if not instances:
        raise RequestError(422, "empty_instances", "'instances' is empty: send at least one instance")
    if len(instances) > max_instances:
        raise RequestError(
            413,
            "too_many_instances",
            f"{len(instances)} instances in one request; this service takes at most {max_instances}",
        )
    return instances


def _record_rows(records: list[Any], schema: InputSchema) -> list[list[Any]]:
    if not schema.feature_names:
        raise RequestError(
            422,
            "records_unsupported",
            f"this model takes {schema.kind} arrays of shape {list(schema.shape)}, not records keyed by "
            "feature name",
        )
    names, known = schema.feature_names, frozenset(schema.feature_names)
    rows = []
    for index, record in enumerate(records):
        if type(record) is not dict:
            raise RequestError(
                422,
                "invalid_request",
                f"instance {index} is {_what(record)}, but instance 0 is a record: use one form per request",
            )
        if len(record) != len(names) or record.keys() != known:
            _refuse_keys(index, record, names, known)
        rows.append([record[name] for name in names])
    return rows


def _refuse_keys(index: int, record: dict[str, Any], names: Sequence[str], known: frozenset[str]) -> None:
    missing = [name for name in names if name not in record]
    unknown = [key for key in record if key not in known]
    parts = []
    if missing:
        parts.append(f"missing feature(s) {_listed(missing)}")
    if unknown:
        parts.append(f"unknown feature(s) {_listed(unknown)}")
    code = "missing_features" if missing else "unknown_features"
    raise RequestError(422, code, f"instance {index}: {'; '.join(parts)}")


def _array_leaves(instance: Any, schema: InputSchema, index: int) -> list[list[Any]]:
    """The innermost lists of one array-form instance, once its nesting matches the schema's shape."""
    shape = schema.shape
    if type(instance) is not list:
        form = " or a record keyed by feature name" if schema.feature_names else ""
        raise RequestError(
            422,
            "wrong_shape",
            f"instance {index}: expected an array of shape {list(shape)}{form}, got {_what(instance)}",
        )
    if len(shape) == 1:  # a table's row: the common case, checked without recursion
        if len(instance) != shape[0]:
            raise RequestError(
                422,
                "wrong_shape",
                f"instance {index}: expected {shape[0]} values (shape {list(shape)}), got {len(instance)}",
            )
        return [instance]
    leaves: list[list[Any]] = []
    _collect_leaves(instance, shape, shape, (), index, leaves)
    return leaves


def _collect_leaves(
    value: Any,
    full: tuple[int, ...],
    shape: tuple[int, ...],
    path: tuple[int, ...],
    index: int,
    out: list[list[Any]],
) -> None:
    """Walk one instance's nesting; ``shape`` is what remains of ``full`` at ``path``."""
    where = f" at {list(path)}" if path else ""
    if type(value) is not list:
        raise RequestError(
            422,
            "wrong_shape",
            f"instance {index}: expected shape {list(full)}; {_what(value)}{where} where a list of "
            f"{shape[0]} belongs",
        )
    if len(value) != shape[0]:
        raise RequestError(
            422,
            "wrong_shape",
            f"instance {index}: expected shape {list(full)}; a list of {len(value)}{where} where "
            f"{shape[0]} belong",
        )
    if len(shape) == 1:
        out.append(value)
        return
    for position, item in enumerate(value):
        _collect_leaves(item, full, shape[1:], (*path, position), index, out)


def _to_float32(leaves: list[list[Any]], rows: int, schema: InputSchema) -> np.ndarray:
    types = set(map(type, chain.from_iterable(leaves)))
    if not types <= _NUMBER_TYPES:
        _refuse_first_non_number(leaves, schema)
    try:
        values = np.array(leaves, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float64's range
        values = np.array([[_clamped(v) for v in leaf] for leaf in leaves], dtype=np.float64)
    values = values.reshape(rows, *schema.shape)
    outside = ~(np.abs(values) <= FLOAT32_MAX)  # also catches infinity (Python reads 1e400 as inf)
    if outside.any():
        position = np.unravel_index(int(np.flatnonzero(outside)[0]), values.shape)
        raise RequestError(
            422,
            "non_finite",
            f"instance {position[0]}, {_feature(schema, position[1:])}: {float(values[position])!r} is "
            f"outside the float32 range the model computes in (|x| <= {FLOAT32_MAX:.4g})",
        )
    return values.astype(np.float32)


def _clamped(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _refuse_first_non_number(leaves: list[list[Any]], schema: InputSchema) -> None:
    per_instance = int(np.prod(schema.shape[:-1], dtype=np.int64))
    for number, leaf in enumerate(leaves):
        for column, value in enumerate(leaf):
            if type(value) in _NUMBER_TYPES:
                continue
            index, inner = divmod(number, per_instance)
            outer = np.unravel_index(inner, schema.shape[:-1]) if len(schema.shape) > 1 else ()
            where = f"instance {index}, {_feature(schema, (*map(int, outer), column))}"
            if isinstance(value, NonFinite):
                raise RequestError(
                    422, "non_finite", f"{where}: {value.token} is not a finite number (and not JSON)"
                )
            if type(value) in (list, dict):
                raise RequestError(
                    422,
                    "wrong_shape",
                    f"{where}: {_what(value)} where a number belongs (shape {list(schema.shape)})",
                )
            raise RequestError(422, "wrong_type", f"{where}: expected a number, got {_what(value)}")


def _feature(schema: InputSchema, position: Sequence[int]) -> str:
    if schema.feature_names and len(position) == 1:
        return f"feature {schema.feature_names[position[0]]!r} (index {position[0]})"
    return f"element {[int(p) for p in position]}"


def _what(value: Any) -> str:
    """A value as a message names it: its JSON kind, and short values themselves."""
    if value is None:
        return "null"
    if type(value) is bool:
        return f"a boolean ({str(value).lower()})"
    if type(value) is str:
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if type(value) in (int, float):
        return f"a number ({value!r})"
    if isinstance(value, NonFinite):
        return value.token
    if type(value) is list:
        return f"a list of {len(value)}"
    if type(value) is dict:
        return "an object (a record)"
    return type(value).__name__


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_NAMED_AT_MOST])
    more = len(names) - _NAMED_AT_MOST
    return f"{shown} and {more} more" if more > 0 else shown
