"""OpenAPI entries of the delivery endpoints that are plain Django views (not DRF), merged
into the generated schema through SPECTACULAR_SETTINGS["APPEND_PATHS"] (docs/delivery.md)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/DeliveryError"}
_FILES = ("manifest.json", "manifest.sig", "model.safetensors")


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_CONFIG = {
    "type": "object",
    "required": ["device_id", "profile", "channel", "package", "poll_interval_s", "poll_jitter_s"],
    "properties": {
        "device_id": {"type": "string", "format": "uuid"},
        "profile": {"type": "string", "description": "device profile slug"},
        "channel": {"type": "string", "description": "alias the device follows"},
        "package": {
            "type": "object",
            "nullable": True,
            "description": "null when no release reaches this device",
            "properties": {
                "digest": {"type": "string", "description": "SHA-256 of manifest.json"},
                "size": {"type": "integer", "description": "model.safetensors, bytes"},
                "manifest_url": {"type": "string"},
                "signature_url": {"type": "string"},
                "blob_url": {"type": "string"},
                "signature": {"type": "string", "description": "Ed25519 signature of manifest.json, hex"},
                "key_id": {"type": "string"},
                "model": {"type": "string"},
                "variant_id": {"type": "integer"},
                "release_id": {"type": "integer"},
                "precision_summary": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        "poll_interval_s": {"type": "integer"},
        "poll_jitter_s": {"type": "integer"},
    },
}

_FILE_RESPONSES = {
    "200": {
        "description": "the whole file, streamed (Cache-Control: public, max-age=31536000, immutable)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "206": {"description": "the requested byte range (Content-Range)"},
    "304": {"description": "If-None-Match names the file's ETag"},
    "401": _json(_ERROR, "no valid device token, script token or session"),
    "403": _json(_ERROR, "a person without the viewer role"),
    "404": _json(_ERROR, "unknown package, or not released to the device's profile"),
    "416": _json(_ERROR, "the range lies outside the file (Content-Range: bytes */size)"),
}

APPEND_PATHS: dict[str, Any] = {
    "/api/v1/device/config": {
        "get": {
            "operationId": "device_config",
            "tags": ["device"],
            "summary": "The calling device's package and poll interval",
            "description": (
                "Strong ETag; If-None-Match with it answers 304. Served from the cache: no SQL query "
                "once warm. Too many requests from one device: 429 with Retry-After."
            ),
            "security": [{"deviceToken": []}],
            "parameters": [{"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
            "responses": {
                "200": _json(_CONFIG, "the device's config"),
                "304": {"description": "unchanged since the ETag sent in If-None-Match"},
                "401": _json(_ERROR, "missing, unknown or revoked device token"),
                "429": _json(_ERROR, "throttled; retry after Retry-After seconds"),
            },
        }
    },
    "/api/v1/ping": {
        "get": {
            "operationId": "ping",
            "tags": ["health"],
            "summary": "A constant JSON answer (the config path's performance ceiling)",
            "security": [{}],
            "responses": {"200": _json({"type": "object"}, '{"status": "ok"}')},
        }
    },
    "/api/v1/signing-key": {
        "get": {
            "operationId": "signing_key",
            "tags": ["device"],
            "summary": "The Ed25519 public key that verifies package manifests",
            "security": [{}],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "algorithm": {"type": "string", "enum": ["ed25519"]},
                            "public_key": {"type": "string", "description": "32 bytes, hex"},
                            "key_id": {"type": "string", "description": "first 16 hex of its SHA-256"},
                        },
                    },
                    "the public key",
                )
            },
        }
    },
    "/api/v1/packages/{digest}/{file}": {
        "get": {
            "operationId": "package_file",
            "tags": ["packages"],
            "summary": "Download a package file (streamed; Range supported; immutable)",
            "security": [{"deviceToken": []}, {"apiToken": []}, {"cookieAuth": []}],
            "parameters": [
                {"name": "digest", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "file",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": list(_FILES)},
                },
                {"name": "Range", "in": "header", "schema": {"type": "string"}, "example": "bytes=0-1048575"},
            ],
            "responses": _FILE_RESPONSES,
        }
    },
}

APPEND_COMPONENTS: dict[str, Any] = {
    "schemas": {
        "DeliveryError": {
            "type": "object",
            "properties": {"detail": {"type": "string"}, "errors": {"type": "object"}},
        }
    }
}
