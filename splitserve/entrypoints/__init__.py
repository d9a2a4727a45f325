"""Entry points: the `splitserve` command line, its flags (vLLM spellings included), the
launcher that starts every service of `splitserve serve`, and health checks."""
