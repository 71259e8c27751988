"""SyncBatchNorm: one explicit step per round, and the coordinator that merges rounds.

* `ticket`       what identifies one rank's part in a round (tenant, group, module,
                 phase, rank, world_size, group signature) and the numbers it carries;
* `step`         a rank's step as an object: it contributes at most once and, if the
                 step fails before contributing, aborts the round for its peers once;
* `coordinator`  rounds in progress, merged in rank order (in process).

`bnserver.rpc.coordinator_client` offers the same `Reducer` contract over gRPC,
for servers started with `--coordinator`.
"""
