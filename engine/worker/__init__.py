"""The worker: model runner, sampler, CUDA graphs."""
