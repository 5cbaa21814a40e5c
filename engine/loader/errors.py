"""The one error the loaders raise: a model that cannot be found, read or built, with a message naming the file,
tensor or field at fault. Torch-free, so the control plane can catch it."""


class ModelLoadError(ValueError):
    pass
