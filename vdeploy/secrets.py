"""Secrets in a recipe's `env`: which values look like one, and the `${NAME}` reference that keeps them out.

A recipe's `env` value written `${NAME}` is taken from the environment the deployment runs in (the environment of
`vdeploy apply`, which its supervisor inherits; a systemd EnvironmentFile; a Kubernetes Secret), so a token never
sits in the recipe, the state directory or a rendered file. A literal value under a secret-looking name is a lint
warning, and renderers never write one inline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH)S?($|_)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"^(hf_|sk-|ghp_|gho_|github_pat_|xox[abp]-|glpat-|AKIA)[A-Za-z0-9_\-]{8,}")
_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class EnvReferenceError(Exception):
    """An `env` value refers to a variable that is not set where the deployment runs."""


def reference(value: str) -> str | None:
    """The variable a `${NAME}` value refers to, else None."""
    match = _REFERENCE.match(value)
    return match.group(1) if match else None


def is_secret(name: str, value: str) -> bool:
    """Whether `name=value` looks like a credential (by its name, or by a well-known token prefix)."""
    return bool(_SECRET_NAME.search(name) or _SECRET_VALUE.match(value))


def literal_secrets(env: Mapping[str, str]) -> list[str]:
    """Names of the entries of `env` that hold a secret-looking value literally (not a `${NAME}` reference)."""
    return [name for name, value in env.items() if reference(str(value)) is None and is_secret(name, str(value))]


def secret_names(env: Mapping[str, str]) -> list[str]:
    """Names of the entries of `env` that renderers keep out of their text: secrets, literal or referenced."""
    return sorted(name for name, value in env.items() if reference(str(value)) or is_secret(name, str(value)))


def resolve(env: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """`env` with each `${NAME}` replaced by NAME's value in `environ`; EnvReferenceError names any that is unset."""
    resolved = {}
    for name, value in env.items():
        variable = reference(str(value))
        if variable is not None and variable not in environ:
            raise EnvReferenceError(
                f"env {name} refers to ${{{variable}}}, which is not set in the environment of `vdeploy apply` "
                "(or of the supervisor's service)"
            )
        resolved[name] = environ[variable] if variable is not None else str(value)
    return resolved
