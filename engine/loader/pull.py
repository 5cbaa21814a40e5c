"""`python -m vdeploy_engine.loader.pull MODEL [--revision R] [--download-dir D]`: fetch a model's files into the
cache the engine reads (the same resolve_model a replica runs), reporting `pulling` phases on stderr.

`vdeploy pull` runs this: downloading is the engine's business (its dependencies, its cache rules), and the control
plane stays free of hub libraries. The last line on stdout is `{"path": ...}`; a failure is one line on stderr,
`PullError: <why>`, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from vdeploy_engine import progress
from vdeploy_engine.loader.errors import ModelLoadError
from vdeploy_engine.loader.hub import resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdeploy_engine.loader.pull", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--revision")
    parser.add_argument("--download-dir")
    args = parser.parse_args(argv)
    progress.use_events()
    try:
        path = resolve_model(args.model, args.revision, args.download_dir)
    except ModelLoadError as error:
        print(f"PullError: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
