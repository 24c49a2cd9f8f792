import os

import pytest

from tests.checkpoints import digits_qann, digits_vit  # noqa: F401  session fixtures for every test folder

pytest_plugins = ["tests.interrupt"]  # Ctrl-C inside a Lightning run ends the session

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never write W&B runs


@pytest.fixture(autouse=True)
def _runs_write_under_tmp(monkeypatch, tmp_path):
    """Every test runs in its own temporary folder: a run that writes to the relative ``logs/`` of
    a config (checkpoints, CSV, plots) writes there, never into the repository.
    ``tests/test_cli.py::test_config_relative_logs_stay_in_the_test_folder`` checks it."""
    monkeypatch.chdir(tmp_path)
