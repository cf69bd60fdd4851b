"""`supermix`: the local runtime (terminal chat, web chat, OpenAI-compatible API). Never imports builder."""
