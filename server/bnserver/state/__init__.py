"""Module state and its persistence. No protobuf, no gRPC.

* `batchnorm`       the BatchNorm module object: config, parameters, running
                    statistics, training flag, and the locks that guard them;
* `registry`        the named modules of one server, per tenant;
* `backward_store`  single-use backward handles, bounded in count and bytes;
* `persistence`     one file per module under the state directory.
"""
