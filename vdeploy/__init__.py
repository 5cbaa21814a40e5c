"""vdeploy: declarative, OOM-safe deployments of LLM inference servers. The control plane never imports torch."""

__version__ = "0.1.0"
