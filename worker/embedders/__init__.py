"""Embedding backends (``ports.Embedder``, ``ports.BatchJobs``): the google-genai adapters."""
