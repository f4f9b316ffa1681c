"""The tracking store a spec names, checked without opening it: can MLflow use its scheme, and
does a local store exist yet (reading must not create one). MLflow is imported only by the
scheme check, so a plan that does not look the store up starts without it."""

from __future__ import annotations

from pathlib import Path

from bnew_core.config import BnewError


def check_tracking_uri(uri: str) -> None:
    """Raise a one-line `BnewError` if MLflow has no tracking store for the URI's scheme."""
    from mlflow.exceptions import MlflowException  # heavy: ~1 s
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # MLflow's own table of schemes

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        schemes = ", ".join(sorted(scheme for scheme in _tracking_store_registry._registry if scheme))
        raise BnewError(f"tracking_uri: {uri}: not a store MLflow can use (schemes: {schemes})") from None


def store_exists(uri: str) -> bool:
    """False for a local SQLite store not created yet."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()
