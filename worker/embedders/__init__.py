"""Embedding backends behind one small protocol."""

from worker.embedders.base import Embedder

__all__ = ["Embedder"]
