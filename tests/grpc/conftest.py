"""Fixtures shared by the in-process gRPC tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.tools.certs import make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA with device/edge/cloud and client certificates, and an impostor CA's set in other/."""
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder)
    make_certificates(folder / "other", ca_name="impostor-ca")
    return folder
