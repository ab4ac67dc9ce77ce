"""The field schemas the API's request bodies and answers share (ids, names, durations, roles),
and the helpers that build schemas. Patterns and bounds come from the core grammar
(eucareg/core/grammar.py), so a value the API accepts is one the rest of eucareg accepts.
"""

from __future__ import annotations

import re
from typing import Any

from eucareg.api.validate import MAX_DURATION
from eucareg.core import grammar
from eucareg.core.model import Role
from eucareg.core.trust import Task

Schema = dict[str, Any]


def full(regex: re.Pattern[str]) -> str:
    """A grammar's full-match regex as a JSON Schema pattern (which matches anywhere)."""
    return f"^(?:{regex.pattern})$"


def _text(regex: re.Pattern[str], low: int, high: int, name: str, what: str) -> Schema:
    # "x-grammar" names the grammar whose message a refusal gives.
    return {
        "type": "string",
        "pattern": full(regex),
        "minLength": low,
        "maxLength": high,
        "x-grammar": name,
        "description": what,
    }


COMPONENT_ID = _text(
    grammar.COMPONENT_ID, 8, 64, "component_id", "A component id: 8-64 of a-z 0-9 -."
)
CLUSTER = _text(grammar.CLUSTER, 1, 64, "cluster", "A cluster name: 1-64 of A-Z a-z 0-9 _ . -.")
FINGERPRINT = _text(
    grammar.FINGERPRINT, 71, 71, "fingerprint", "A key fingerprint: sha256: and 64 hex digits."
)
TOKEN_ID = _text(grammar.TOKEN_ID, 12, 12, "token_id", "A join token id: 12 of a-z 0-9.")
# The serial of a certificate this registrar issued, as the agent writes it (lowercase hex).
SERIAL = {"type": "string", "pattern": "^[0-9a-f]{1,64}$", "description": "A serial, in hex."}
DURATION: Schema = {
    "anyOf": [
        # grammar._DURATION is the one duration grammar (it has no public name yet).
        {"type": "string", "pattern": full(grammar._DURATION), "maxLength": 430},
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DURATION},
    ],
    "x-grammar": "duration",
    "description": "A duration: seconds, or a string such as '30s', '5m', '1.5h', '2d'; "
    "more than zero and at most 3650d.",
}
ROLE = {"enum": [r.value for r in Role if r is not Role.CLC]}
TASKS: Schema = {
    "anyOf": [
        {"enum": ["clc", "cc", "all"]},
        # No uniqueItems: jsonschema compares unsortable items pairwise, and 5000 objects in a
        # body took 15 s of the event loop. A task named twice is simply the same task.
        {"type": "array", "items": {"enum": [t.value for t in Task]}, "maxItems": len(Task)},
        {"type": "null"},
    ],
    "x-error": "must be clc, cc, all or a list of those",
    "description": "The tasks to lock or unlock; all, null or [] is every task this registrar has.",
}


def object_(
    properties: Schema, required: tuple[str, ...] = (), more: Schema | None = None
) -> Schema:
    """An object of exactly these `properties` (no others), `more` merged in."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
        **(more or {}),
    }
