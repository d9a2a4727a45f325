"""splitserve.gateway: the OpenAI-compatible HTTP front (FastAPI) over the tokenizer and
scheduler gRPC services.

Public entry points: `config.GatewayConfig`, `app.build_app(config, clients=None)` and
`server.run_gateway(config)`. Imports no torch and no model code.
"""
