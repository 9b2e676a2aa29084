"""Optional integrations. Each submodule imports its framework; importing this package does not.

``coordinator.integrations.langgraph`` (needs the ``langgraph`` extra): a callback handler that
publishes lifecycle events and an adapter that serves a compiled LangGraph graph as an agent.
"""

__all__: list[str] = []
