"""JSON Schema of a policy file, for editors (committed as policies/schema.json, kept in sync by a test).

The pydantic schema describes the validated shape; a few fields accept a shorter YAML
form (one name instead of a list; a bare destination name), which is added here.
Cross-field rules (δ < 1/min_cohort, …) are not expressible in JSON Schema; run
`worldlm-secure policy check` for those.
"""

from __future__ import annotations

import json
from typing import Any

from worldlm_secure.policy.schema import Policy

SCHEMA_ID = "https://worldlm-secure.example/schemas/policy-v1.json"


def _one_or_many(prop: dict[str, Any]) -> dict[str, Any]:
    items = prop.get("items", {})
    rest = {k: v for k, v in prop.items() if k not in ("type", "items", "minItems", "maxItems")}
    array = {k: v for k, v in prop.items() if k in ("type", "items", "minItems", "maxItems")}
    return {**rest, "anyOf": [items, array]}


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) a policy YAML file must satisfy."""
    schema = Policy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "worldlm-secure JurisdictionPolicy (apiVersion worldlm-secure/v1)"
    defs = schema["$defs"]
    props = defs["SecureAggregation"]["properties"]
    props["protocol"] = _one_or_many(props["protocol"])
    props = defs["DifferentialPrivacy"]["properties"]
    props["mechanism"] = _one_or_many(props["mechanism"])
    dest = defs["Egress"]["properties"]["destinations"]
    dest["items"] = {"anyOf": [{"type": "string", "minLength": 1}, dest["items"]]}
    # a destination is ONE of a node name, a relation (parent | ancestors | root) or a jurisdiction
    defs["Destination"]["oneOf"] = [{"required": [k]} for k in ("name", "relation", "jurisdiction")]
    # a file that extends another may leave out what it inherits (but says what it is)
    schema["required"] = ["apiVersion", "kind", "name"]
    schema["if"] = {"not": {"required": ["extends"]}}
    schema["then"] = {"required": ["jurisdiction"]}
    return schema


def policy_json_schema_text() -> str:
    """The schema as the exact text committed in policies/schema.json."""
    return json.dumps(policy_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
