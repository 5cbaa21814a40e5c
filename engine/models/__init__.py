"""Engine model modules. `vdeploy_engine.models.registry` maps an HF architecture name to its module without importing torch."""
