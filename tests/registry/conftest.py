from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained heads and cached engine outputs, shared by the tests of one session."""
    return tmp_path_factory.mktemp("engine")


@pytest.fixture
def engine_settings(settings, tmp_path: Path, shared_engine_dir: Path):
    settings.ENGINE_DATA_DIR = shared_engine_dir
    settings.OPTUNA_STORAGE_URL = f"sqlite:///{tmp_path / 'optuna.sqlite3'}"
    settings.EDGEFIT_STALE_SECONDS = 2
    return settings


_PROFILES: dict[str, dict] = {}


@pytest.fixture
def tiny_model(db, engine_settings):
    """The tiny bundle registered, with its sensitivity profile (measured once per session)."""
    from registry.engine import compute_sensitivity, register_bundle
    from registry.models import BaseModel

    model = register_bundle("tiny-topics")
    if "tiny" not in _PROFILES:
        compute_sensitivity(model)
        model.refresh_from_db()
        _PROFILES["tiny"] = model.sensitivity
    BaseModel.objects.filter(pk=model.pk).update(sensitivity=_PROFILES["tiny"])
    model.refresh_from_db()
    return model


# Every non-integration test already gets its own empty cache (tests/conftest.py: _private_cache).


@pytest.fixture
def fleet():
    """The dashboard's demo fleet: profiles, a model, variants and a finished run (factories)."""
    from tests.registry.factories import demo_fleet

    return demo_fleet()
