"""The `bnserver` command line and the helpers that start its processes.

* `main`       argument parsing and the subcommands (serve, coordinator, up, health, ...);
* `processes`  starting `bnserver` child processes on free ports (for `up`, tests, bench);
* `cluster`    `bnserver up`: a coordinator and N servers as local processes.
"""

from bnserver.cli.main import main

__all__ = ["main"]
