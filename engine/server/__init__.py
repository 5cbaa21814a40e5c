"""The OpenAI-compatible HTTP server of one engine replica (`python -m engine.server --config plan.json`)."""
