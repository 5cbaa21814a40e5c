"""The OpenAI-compatible HTTP server of one engine replica (`python -m vdeploy_engine.server --config plan.json`)."""
