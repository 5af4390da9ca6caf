"""The extension's own HTTP route: `GET /semantic-fidelity/v1/params` lists every control with its
type, default, range and choices (generated from params.py), for API clients."""

from __future__ import annotations

from .. import params

PARAMS_ROUTE = "/semantic-fidelity/v1/params"


def add_routes(_demo, app) -> None:
    """`script_callbacks.on_app_started` callback (FastAPI app of A1111 and Forge)."""
    app.add_api_route(PARAMS_ROUTE, params.api_schema, methods=["GET"])
