"""The in-process engine: `LLM` (generate, chat, embed) with the scheduler and worker in one
process, no gRPC between them."""
