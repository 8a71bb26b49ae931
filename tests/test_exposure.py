"""A public bind or share link needs a password; loopback does not."""
from __future__ import annotations

import pytest

from studio.errors import StudioError
from studio.exposure import is_loopback, serving_auth
from tests.conftest import run_cli


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("")


def test_public_bind_needs_auth(monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_AUTH", raising=False)
    assert serving_auth("127.0.0.1", share=False, auth=None) is None
    with pytest.raises(StudioError, match="without a password"):
        serving_auth("0.0.0.0", share=False, auth=None)
    with pytest.raises(StudioError, match="share link"):
        serving_auth("127.0.0.1", share=True, auth=None)
    with pytest.raises(StudioError, match="at least 8"):
        serving_auth("0.0.0.0", share=False, auth="me:short")
    assert serving_auth("0.0.0.0", share=False, auth="me:long-enough") == ("me", "long-enough")
    monkeypatch.setenv("LORA_STUDIO_AUTH", "ops:from-the-environment")
    assert serving_auth("0.0.0.0", share=False, auth=None) == ("ops", "from-the-environment")


def test_cli_refuses_listen_without_auth(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_AUTH", raising=False)
    result = run_cli("ui", "--listen", "--workspace", tmp_path / "ws", timeout=120)
    assert result.returncode == 2 and "without a password" in result.stderr and "Traceback" not in result.stderr


def test_upload_limit_from_the_environment(monkeypatch):
    from studio.exposure import MAX_UPLOAD_BYTES, MAX_UPLOAD_ENV, max_upload_bytes

    monkeypatch.delenv(MAX_UPLOAD_ENV, raising=False)
    assert max_upload_bytes() == MAX_UPLOAD_BYTES
    monkeypatch.setenv(MAX_UPLOAD_ENV, "1.5")
    assert max_upload_bytes() == int(1.5 * 1024**2)
    for bad in ("lots", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(MAX_UPLOAD_ENV, bad)
        with pytest.raises(StudioError, match="is not a size in MiB"):
            max_upload_bytes()
