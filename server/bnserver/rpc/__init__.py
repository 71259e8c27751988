"""Thin gRPC shells: decode a request, call the domain layer, encode the reply.

* `status`               the one table between domain errors and status codes;
* `shell`                the decorators that apply it, and a call's deadline as a CallContext;
* `codec`                protobuf messages <-> domain objects;
* `registration`         servicers registered so that request bytes are parsed by us;
* `batchnorm_service`    bnservice.v1.BatchNormService over an Engine;
* `coordinator_service`  bnservice.v1.CoordinatorService over a Coordinator;
* `auth`                 tenant tokens, and the peer credential of the coordinator service;
* `server`               the factory that puts services, health and reflection on a port.
"""
