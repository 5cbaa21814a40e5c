"""The engine core: scheduler, KV cache blocks and prefix cache, sequences, the step loop."""
