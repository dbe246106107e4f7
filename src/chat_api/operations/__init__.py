"""The kinds of call the gateway meters: one module each, all run by `chat_api.engine`."""
