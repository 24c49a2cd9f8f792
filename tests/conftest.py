import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never write W&B runs


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch, tmp_path):
    # runs started by tests write under a temporary dir, never the repo's logs/
    monkeypatch.setenv("CSDLAB_TEST_TMP", str(tmp_path))
