"""bnserver: the server side of bnservice.

Layers, each knowing only the one below it:

* `kernel`      pure numpy functions (statistics, normalize, gradients);
* `modules`     BatchNorm module objects, `registry` of named modules,
                `handles` for backward contexts, `engine` the RPC-shaped facade;
* `service`     the thin gRPC servicer and the one error table, `server` the factory;
* `cli`         the `bnserver` command.
"""

__version__ = "0.1.0"
