"""The gRPC front end: the Inference servicer, session affinity and the server that runs it all."""
