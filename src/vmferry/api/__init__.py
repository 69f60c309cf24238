"""The wire models of vmferry's two HTTP APIs (agent and controller) and the agent client.

Both sides import these models: the server to validate what it receives and to shape what it
answers, the client to build requests and to parse answers. Nothing here does I/O except
``agent_client``.
"""
