"""OpenAI-compatible engines (vLLM, SGLang, llama.cpp, another mimoserve, OpenAI) behind the API."""
