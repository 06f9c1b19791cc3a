"""Serve plotly.js from the installed `plotly` package so the dashboard never needs a CDN.

The Python package ships the exact plotly.min.js its figures are built for; exposing that one
file as `vendor/plotly.min.js` keeps the two in step without copying 4.6 MB into the repo.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

STATIC_PATH = "vendor/plotly.min.js"


def _plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")  # locate without importing plotly (slow)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the plotly package is not installed; run the README's first command")
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


class PlotlyFinder(BaseFinder):
    def check(self, **kwargs: Any) -> list[Any]:
        return []

    def find(self, path: str, find_all: bool = False, **kwargs: Any) -> Any:
        if path == STATIC_PATH:
            found = str(_plotly_js())
            return [found] if find_all else found
        return [] if find_all else ""

    def list(self, ignore_patterns: Any) -> Any:
        source = _plotly_js()
        storage = FileSystemStorage(location=str(source.parent))
        storage.prefix = "vendor"  # type: ignore[attr-defined]  # collectstatic reads it
        yield source.name, storage
