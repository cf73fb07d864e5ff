"""The CNI executable (console script `whereabouts-py`, and the node's wrapper written by
deploy/install.py): the node agent's answer when it gives one (ipam.shim), else the call in this
process (ipam.cni, direct mode). It depends on both; neither depends on the other.

Until the agent has answered it imports nothing but ipam.shim (tests/test_shim_imports.py).
"""

import sys

from . import shim


def main() -> int:
    """Direct mode needs site-packages: an interpreter started with -S (the fast path) loads them now."""
    try:
        stdin = shim.read_stdin()
    except OSError as exc:
        sys.stdout.write(
            '{"cniVersion": "1.1.0", "code": 5, "msg": "failed to read network config from stdin", '
            f'"details": {shim.dumps_str(str(exc))}}}\n'
        )
        return 1
    answered = shim.try_agent(shim.environ(), stdin)
    if answered is not None:
        sys.stdout.write(answered[1])
        return answered[0]
    if sys.flags.no_site:
        import site

        site.main()
    import os

    from .cni import run

    return run(os.environ, stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
