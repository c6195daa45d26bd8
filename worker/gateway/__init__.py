"""An HTTP front door to the fleet that the ``openai`` and ``google-genai`` SDKs speak unmodified.

- ``openai_routes``: OpenAI's ``POST /v1/embeddings`` (bearer key); ``gemini_routes``: Gemini's
  ``:batchEmbedContents`` and ``:embedContent`` (``x-goog-api-key`` or ``?key=``); each parses its API's request into
  a ``calls.Job`` and writes answers and errors in its API's shapes.
- ``calls``: a Job is one RPC over Direct Reply-to through ``worker.client.EmbedClient`` carrying ``x-deadline``; its
  failures become HTTP statuses (``calls.Failure``).
- ``app``: the aiohttp server (limits, keys, the in-flight bound, health and metrics) and ``run_gateway``, the
  composition root; ``cli``: ``embed-worker gateway`` and ``python -m worker.gateway``; ``settings``:
  ``GatewaySettings``.
"""
