"""The outbound HTTP client of a service that calls other systems (webhooks, integrations)."""

from __future__ import annotations

import httpx


class OwnsHttpClient:
    """A mixin: ``client`` is created on first use and closed by ``close()``; a client injected
    through the setter (a test transport, a proxy) belongs to whoever injected it."""

    _client: httpx.AsyncClient | None = None
    _owns_client: bool = True
    client_timeout: float | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.client_timeout,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
            self._owns_client = True
        return self._client

    @client.setter
    def client(self, value: httpx.AsyncClient) -> None:
        self._client = value
        self._owns_client = False

    async def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None
