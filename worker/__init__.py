"""embed-worker: a RabbitMQ consumer that batches embedding requests for the Gemini API."""

__version__ = "0.1.0"
