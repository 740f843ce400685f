"""The HTTP front end: KServe v2 REST, Triton's generate extension and the playground page on one port."""
