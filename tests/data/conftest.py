"""Fixtures for the data tests: a local HTTP server, no proxies, a count of the bytes hashed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.data import cache
from tests.data.httpd import Server, serve


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; the tests talk to 127.0.0.1 only, directly."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as s:
        yield s


class HashCounter:
    def __init__(self) -> None:
        self.bytes = 0

    def make(self) -> Any:
        counter, real = self, cache.hashlib.sha256()

        class Counting:
            def update(self, data: bytes) -> None:
                counter.bytes += len(data)
                real.update(data)

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Counting()


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> HashCounter:
    """How many bytes `harness.data.cache` hashes from now on."""
    counter = HashCounter()
    monkeypatch.setattr(cache, "_hasher", counter.make)
    return counter
