from __future__ import annotations

from typing import Any

GIB = 1024**3


def profile_payload(**overrides: Any) -> dict[str, Any]:
    """A valid profile as the API accepts it; override fields to make it invalid."""
    payload: dict[str, Any] = {
        "name": "Test Phone X",
        "vendor": "Acme",
        "soc": "Acme A1",
        "kind": "phone",
        "ram_total_bytes": 8 * GIB,
        "ram_budget_bytes": 2 * GIB,
        "bandwidth_gbs": 51.2,
        "int8_tops": 35.0,
        "fp16_tflops": 17.5,
        "weight_formats": ["fp32", "fp16", "int8", "int4"],
        "activation_formats": ["fp32", "fp16"],
        "fleet_share": 0.1,
        "sources": {
            "ram_total_bytes": "https://example.com/acme-x/specs",
            "ram_budget_bytes": "derived: 25 % of ram_total_bytes",
            "bandwidth_gbs": "https://example.com/acme-a1",
            "int8_tops": "measured on 2026-11-21 by edgefit-agent profile",
            "fp16_tflops": "derived: half of int8_tops",
        },
    }
    payload.update(overrides)
    return payload
