"""The fast path's route, worked out without importing google-genai (``gemini.sdk_route``), is the one the installed
SDK's client sends: URL with API version, key and client identification, for the default endpoint and another."""

from __future__ import annotations

import pytest
from google import genai
from google.genai import types
from pydantic import SecretStr

from worker.embedders.gemini import _fast_route, sdk_route


@pytest.mark.parametrize("base_url", [None, "http://127.0.0.1:8089", "https://proxy.example/gemini/"])
def test_the_route_worked_out_is_the_sdks(base_url: str | None) -> None:
    client = genai.Client(api_key="the-key", http_options=types.HttpOptions(base_url=base_url))
    assert sdk_route(SecretStr("the-key"), base_url) == _fast_route(client)
