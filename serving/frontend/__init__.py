"""Front ends that speak standard protocols on the same runtime as rnnserve.v1.

`kserve_common` maps the KServe v2 inference protocol (as Triton speaks it) onto the runtime once;
`kserve_grpc` serves it as `inference.GRPCInferenceService` beside rnnserve.v1 on the gRPC port,
and `http` serves it as REST, with Triton's generate extension and the playground page, on the
HTTP port. Every door sees the same sessions.
"""
