"""splitserve.tokenizer_svc: tokenization, chat templates, incremental detokenization and stop
strings, served over gRPC (`splitserve.tokenizer.v1.TokenizerService`).

- `config.TokenizerServiceConfig`: the service's settings (CLI flags are generated from it).
- `tokenizer.load_tokenizer` / `TokenizerHandle`: the loaded tokenizer and its facts.
- `detokenizer.IncrementalDetokenizer`, `stop_strings.StopStringChecker`,
  `stream.SequenceStream`: one sequence's streamed text (the `DetokenizeStream` RPC).
- `chat.ChatRenderer`: OpenAI messages to prompt text and ids, render time bounded.
- `prepare`: one request's pre-generation work (the `Prepare` RPC; the offline LLM shares it).
- `server.run_tokenizer_service(config, address)`: the process entry point.
"""
