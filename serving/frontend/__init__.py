"""The front ends: every door onto the runtime, and the server that runs them all.

`servicer` serves rnnserve.v1 over gRPC, `affinity` keeps a session on its replica, and `server`
builds the one grpc.aio server. `kserve_common` maps the KServe v2 inference protocol (as Triton
speaks it) onto the runtime once; `kserve_grpc` serves it as `inference.GRPCInferenceService`
beside rnnserve.v1 on the gRPC port, and `http` serves it as REST, with Triton's generate extension
and the playground page, on the HTTP port. Every door sees the same sessions.
"""
