"""Links into MLflow's UI: the one URL of a sweep's experiment, and how to open a local store."""

from __future__ import annotations

import contextlib

from sweeps.records.tracker import Tracker

LOCAL_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` serves a local store."""


def experiment_page(server_url: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's UI. MLflow 3.17.2's UI picks an experiment's landing
    page from its GenAI / Machine learning switch only: the `workflowType` URL parameter, else
    the browser's last choice (localStorage `mlflow.workflowType_v1`), else GenAI. It reads the
    kind tag only when that switch is disabled, which the 3.17.2 bundle never does, and no server
    setting exists: a bare experiment URL in a new browser opens the GenAI overview, so the link
    names the workflow."""
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def experiment_url(tracking_uri: str, experiment_name: str, server_url: str | None = None) -> str | None:
    """The experiment's page on `server_url` (default: the tracking server itself), or None if
    the store has no such experiment yet or cannot be read (a link never creates one)."""
    with contextlib.suppress(Exception):  # only a link: a server gone by now must not hide what the caller prints
        experiment_id = Tracker(tracking_uri).experiment_id(experiment_name, create=False)
        if experiment_id is not None:
            return experiment_page(server_url or tracking_uri, experiment_id)
    return None


def ui_hint(tracking_uri: str, experiment_name: str) -> str:
    """Where to see the sweep: its experiment page on the server, or how to serve a local store."""
    if tracking_uri.startswith("http"):
        return experiment_url(tracking_uri, experiment_name) or tracking_uri
    page = experiment_url(tracking_uri, experiment_name, LOCAL_UI) or LOCAL_UI
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1  (then {page})"
