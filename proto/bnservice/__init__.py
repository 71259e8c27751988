"""bnservice: the wire protocol of the batch-normalization service.

`bnservice.v1` holds the generated protocol modules (never edited by hand);
`bnservice.wire` converts between numpy arrays and the `Tensor` message.
"""
