"""Ray Serve endpoint: an OpenAI-compatible ingress over separately scaled coarse and zoom deployments."""
