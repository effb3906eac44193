"""The review API as an OpenAPI 3.1 document, served at `/reviews/openapi.json`.

Scripts outside the suite rely on these paths; the suite runs schemathesis against this
document and the live admin listener, so the document and the handlers cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from sidecar.review.cursor import CURSOR_PATTERN

__all__ = ["REVIEWER_PATTERN", "ROUTE_PATTERN", "openapi_document"]

_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_STATUS = {"type": "string", "enum": ["pending", "claimed", "resolved"]}
_DECISION = {"type": ["string", "null"], "enum": ["approve", "override", "reject", None]}
#: A reviewer: letters, digits and `_.@+-`, spaces inside (e.g. "Alice Smith", "a@b.example").
REVIEWER_PATTERN = r"^[A-Za-z0-9_.@+-]([A-Za-z0-9_.@+ -]*[A-Za-z0-9_.@+-])?$"
#: A route name, as the policy schema allows it.
ROUTE_PATTERN = r"^[A-Za-z0-9_.-]+$"
_NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": REVIEWER_PATTERN}
_ROUTE = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": ROUTE_PATTERN}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": _ID}
_AUTH_ERRORS = {
    "401": _error_response("The reviewer token is missing or wrong."),
    "403": _error_response("No reviewer token is configured on a non-loopback listener."),
}

_SUMMARY_PROPS: dict[str, Any] = {
    "id": _ID,
    "route": {"type": "string"},
    "status": _STATUS,
    "confidence": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "created_at": {"type": "string", "format": "date-time"},
    "reason": {"type": "string", "enum": ["review", "reject", "missing", "audit"]},
    "action": {"type": "string"},
    "request_id": {"type": "string"},
    "trace_id": {"type": "string"},
    "claimed_by": {"type": ["string", "null"]},
    "lease_until": _TIME,
    "decision": _DECISION,
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code", "failure_mode"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string", "const": "sidecar_error"},
                    "code": {"type": "string"},
                    "failure_mode": {"type": "string"},
                    "request_id": {"type": "string"},
                    "trace_id": {"type": "string"},
                },
            }
        },
    },
    "ReviewSummary": {
        "type": "object",
        "required": list(_SUMMARY_PROPS),
        "properties": _SUMMARY_PROPS,
    },
    "Review": {
        "type": "object",
        "required": [*_SUMMARY_PROPS, "request", "answer", "status_url"],
        "properties": {
            **_SUMMARY_PROPS,
            "request": {
                "type": "object",
                "description": "method, path, content_type, body (text, capped), body_truncated",
            },
            "answer": {
                "type": "object",
                "description": "status, content_type, content_encoding, body (text, capped), "
                "body_truncated",
            },
            "reviewer": {"type": ["string", "null"]},
            "note": {"type": ["string", "null"]},
            "corrected_answer": {"description": "The reviewer's answer for an override."},
            "resolved_at": _TIME,
            "status_url": {"type": "string"},
        },
    },
    "ReviewPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/ReviewSummary"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Claim": {
        "type": "object",
        "required": ["reviewer"],
        "properties": {
            "reviewer": _NAME,
            "lease_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        },
    },
    "ClaimNext": {
        "type": "object",
        "required": ["reviewer"],
        "properties": {
            "reviewer": _NAME,
            "route": _ROUTE,
            "lease_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        },
    },
    "Resolve": {
        "type": "object",
        "required": ["decision", "reviewer"],
        "properties": {
            "decision": {"type": "string", "enum": ["approve", "override", "reject"]},
            "reviewer": _NAME,
            "note": {"type": ["string", "null"], "maxLength": 4000},
            "answer": {"description": "The corrected answer (any JSON); needed for override."},
        },
        "if": {"properties": {"decision": {"const": "override"}}},
        "then": {"required": ["answer"]},
    },
    "ReviewStatus": {
        "type": "object",
        "required": ["status", "decision"],
        "additionalProperties": False,
        "properties": {"status": _STATUS, "decision": _DECISION},
    },
}


def openapi_document() -> dict[str, Any]:
    item_errors = {
        **_AUTH_ERRORS,
        "404": _error_response("No such review."),
        "503": _error_response("The review store is unavailable."),
    }
    write_errors = {
        **item_errors,
        "400": _error_response("The body is not valid."),
        "409": _error_response("Already resolved, or claimed by someone else."),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sidecar review API",
            "version": "1",
            "description": "Low-confidence answers queued for human review, on the sidecar's "
            "admin listener. Every path except the status capability URL needs the reviewer "
            "token (SIDECAR_REVIEWER_TOKEN) as a bearer token.",
        },
        "components": {
            "securitySchemes": {"reviewer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
        "security": [{"reviewer": []}],
        "paths": {
            "/reviews": {
                "get": {
                    "operationId": "listReviews",
                    "summary": "List review items, oldest first.",
                    "parameters": [
                        {"name": "route", "in": "query", "schema": _ROUTE},
                        {"name": "status", "in": "query", "schema": _STATUS},
                        {
                            "name": "older_than",
                            "in": "query",
                            "description": "Only items at least this old (e.g. 30s, 5m, 2h).",
                            "schema": {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)?$"},
                        },
                        {
                            "name": "newer_than",
                            "in": "query",
                            "description": "Only items at most this old (e.g. 30s, 5m, 2h).",
                            "schema": {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)?$"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "next_cursor of the previous page.",
                            "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                        },
                    ],
                    "responses": {
                        "200": _json("ReviewPage", "A page of items."),
                        "400": _error_response("A filter is not valid."),
                        **_AUTH_ERRORS,
                        "503": _error_response("The review store is unavailable."),
                    },
                }
            },
            "/reviews/next/claim": {
                "post": {
                    "operationId": "claimNextReview",
                    "summary": "Claim the oldest pending item (of a route); every concurrent "
                    "caller, on any replica sharing the queue, gets a different one.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ClaimNext"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("Review", "The claimed item."),
                        "204": {"description": "Nothing is pending."},
                        "400": _error_response("The body is not valid."),
                        **_AUTH_ERRORS,
                        "503": _error_response("The review store is unavailable."),
                    },
                }
            },
            "/reviews/{id}": {
                "get": {
                    "operationId": "getReview",
                    "summary": "One review item with its request and the model's answer.",
                    "parameters": [_ID_PARAM],
                    "responses": {"200": _json("Review", "The item."), **item_errors},
                }
            },
            "/reviews/{id}/claim": {
                "post": {
                    "operationId": "claimReview",
                    "summary": "Take (or renew) a lease on an item.",
                    "parameters": [_ID_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Claim"}}
                        },
                    },
                    "responses": {"200": _json("Review", "The claimed item."), **write_errors},
                }
            },
            "/reviews/{id}/resolve": {
                "post": {
                    "operationId": "resolveReview",
                    "summary": "Decide an item, once.",
                    "parameters": [_ID_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Resolve"}}
                        },
                    },
                    "responses": {"200": _json("Review", "The resolved item."), **write_errors},
                }
            },
            "/reviews/status/{token}": {
                "get": {
                    "operationId": "reviewStatus",
                    "summary": "The caller's capability URL: status and decision only.",
                    "security": [],
                    "parameters": [
                        {
                            "name": "token",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1},
                        }
                    ],
                    "responses": {
                        "200": _json("ReviewStatus", "Status and decision."),
                        "404": _error_response("No such review, or a forged token."),
                        "503": _error_response("The review store is unavailable."),
                    },
                }
            },
        },
    }
