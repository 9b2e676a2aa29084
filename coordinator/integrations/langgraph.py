"""LangGraph/LangChain integration: lifecycle events from callbacks, and a compiled graph served
as an agent.

``EventCallbackHandler`` turns LangChain callbacks into lifecycle events published with
``Context.emit`` (agent, node, session and message ids are filled in by the context):
tool start -> ``agent:tool_call``, tool end/error -> ``agent:tool_result``, model end ->
``agent:message``, model error or a failed graph run -> ``agent:failed``. Every event carries
``run_id``/``parent_run_id``. When asked, streamed tokens go to ``Context.emit_token`` (the
session's capped token stream), never to the durable events stream.

``GraphAgent`` serves a compiled graph: the payload becomes the graph input, the session
becomes the checkpointer thread, the handler above is attached, and the final state (or one
key of it) is the reply, converted to msgpack-safe values. Graph nodes and tools reach the
coordinator context with :func:`coordinator_context`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

import anyio
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig

from ..agent import Context, Message

__all__ = ["EventCallbackHandler", "GraphAgent", "coordinator_context", "to_wire",
           "CONTEXT_KEY"]

log = logging.getLogger(__name__)

CONTEXT_KEY = "coordinator_context"
"""The ``configurable`` key under which GraphAgent passes the coordinator Context."""

TOOL_CALL = "agent:tool_call"
TOOL_RESULT = "agent:tool_result"
MESSAGE = "agent:message"
FAILED = "agent:failed"

# Control flow that LangGraph raises through chains (interrupts, Command(goto=parent)); a
# graph that pauses has not failed.
_CONTROL_FLOW = ("GraphInterrupt", "GraphBubbleUp", "NodeInterrupt", "ParentCommand")


class Emitter(Protocol):
    """What the handler publishes through: ``Context.emit`` (and, for tokens,
    ``Context.emit_token(text, run_id=...)`` when the context has it)."""

    def emit(self, type: str, data: dict[str, Any]) -> None: ...


class Graph(Protocol):
    """A compiled LangGraph graph (any Runnable with ``ainvoke``)."""

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> Any: ...


def coordinator_context(config: RunnableConfig | None) -> Context:
    """The coordinator :class:`Context` of the message a GraphAgent is handling.

    Graph nodes and tools take a ``config: RunnableConfig`` parameter and pass it here, then
    ``await ctx.request("other-agent", ...)`` on behalf of their agent and session.

    :raises LookupError: when the graph does not run under a GraphAgent
    """
    context = ((config or {}).get("configurable") or {}).get(CONTEXT_KEY)
    if context is None:
        raise LookupError("no coordinator context in this run; serve the graph with GraphAgent")
    return context  # type: ignore[no-any-return]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more]"


def message_to_wire(message: BaseMessage, limit: int | None = None) -> dict[str, Any]:
    """A LangChain message as a plain dict: type and content, plus tool calls/ids/name."""
    content = to_wire(message.content, limit)
    out: dict[str, Any] = {"type": message.type, "content": content}
    if message.name:
        out["name"] = message.name
    tool_calls = getattr(message, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = [{"name": c["name"], "args": to_wire(c["args"], limit),
                              "id": c.get("id")} for c in tool_calls]
    tool_call_id = getattr(message, "tool_call_id", None)
    if tool_call_id:
        out["tool_call_id"] = tool_call_id
    return out


def to_wire(value: Any, limit: int | None = None) -> Any:
    """Convert a value to what msgpack encodes: messages become ``{"type", "content", ...}``
    dicts, mappings and sequences are converted recursively, anything else unknown becomes its
    ``str``. Strings are cut at ``limit`` characters when given."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _truncate(value, limit) if limit is not None else value
    if isinstance(value, bytes):
        return value
    if isinstance(value, BaseMessage):
        return message_to_wire(value, limit)
    if isinstance(value, Mapping):
        return {str(k): to_wire(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_wire(v, limit) for v in value]
    if isinstance(value, UUID):
        return str(value)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        try:
            return to_wire(model_dump(), limit)
        except Exception:  # a pydantic model that cannot dump is shown as text
            pass
    text = str(value)
    return _truncate(text, limit) if limit is not None else text


def _ids(run_id: UUID, parent_run_id: UUID | None) -> dict[str, Any]:
    return {"run_id": str(run_id),
            "parent_run_id": str(parent_run_id) if parent_run_id else None}


def _error(error: BaseException) -> dict[str, str]:
    return {"error_type": type(error).__name__, "error": str(error)}


class EventCallbackHandler(AsyncCallbackHandler):
    """Publishes lifecycle events for model and tool activity through ``context.emit``.

    :param context: the handler's coordinator Context (anything with ``emit(type, data)``)
    :param enabled: publish nothing when False (the handler can stay attached)
    :param tokens: also stream each model token with ``context.emit_token`` (to the
        session's token stream, not as a lifecycle event)
    :param max_chars: strings in event data are cut to this length
    """

    raise_error = False
    run_inline = True  # keep events in the order LangChain reports them

    def __init__(self, context: Emitter, enabled: bool = True, *, tokens: bool = False,
                 max_chars: int = 4000) -> None:
        super().__init__()
        self.context = context
        self.enabled = enabled
        self.tokens = tokens
        self.max_chars = max_chars
        self._tool_names: dict[UUID, str] = {}

    def _emit(self, type: str, data: dict[str, Any]) -> None:
        emit = getattr(self.context, "emit", None)
        if not self.enabled or emit is None:
            return
        try:
            emit(type, data)
        except Exception as exc:  # events are best effort: never fail the agent's work
            log.warning("could not publish %s: %s", type, exc)

    def _emit_token(self, text: str, run_id: UUID) -> None:
        emit_token = getattr(self.context, "emit_token", None)
        if not self.enabled or emit_token is None:
            return
        try:
            emit_token(text, run_id=str(run_id))
        except Exception as exc:  # tokens are best effort too
            log.warning("could not stream a token: %s", exc)

    # -- tools ------------------------------------------------------------------------------
    async def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None,
                            inputs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        name = str(kwargs.get("name") or (serialized or {}).get("name") or "tool")
        self._tool_names[run_id] = name
        data = {"tool": name,
                "input": to_wire(inputs if inputs is not None else input_str, self.max_chars),
                "tool_call_id": kwargs.get("tool_call_id"), **_ids(run_id, parent_run_id)}
        self._emit(TOOL_CALL, data)

    async def on_tool_end(self, output: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                          tags: list[str] | None = None, **kwargs: Any) -> None:
        tool_call_id = getattr(output, "tool_call_id", None)
        content = output.content if isinstance(output, BaseMessage) else output
        data = {"tool": self._tool_names.pop(run_id, kwargs.get("name")), "ok": True,
                "output": to_wire(content, self.max_chars), "tool_call_id": tool_call_id,
                **_ids(run_id, parent_run_id)}
        self._emit(TOOL_RESULT, data)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            **kwargs: Any) -> None:
        data = {"tool": self._tool_names.pop(run_id, kwargs.get("name")), "ok": False,
                "tool_call_id": kwargs.get("tool_call_id"), **_error(error),
                **_ids(run_id, parent_run_id)}
        self._emit(TOOL_RESULT, data)

    # -- models -----------------------------------------------------------------------------
    async def on_llm_end(self, response: LLMResult, *, run_id: UUID,
                         parent_run_id: UUID | None = None, tags: list[str] | None = None,
                         **kwargs: Any) -> None:
        """Covers chat models too (LangChain reports their end through on_llm_end)."""
        for generations in response.generations:
            for generation in generations[-1:]:
                self._emit_generation(generation, run_id, parent_run_id)

    def _emit_generation(self, generation: Any, run_id: UUID, parent_run_id: UUID | None
                         ) -> None:
        data: dict[str, Any] = _ids(run_id, parent_run_id)
        if isinstance(generation, ChatGeneration):
            message = generation.message
            tool_calls = getattr(message, "tool_calls", None) or []
            if tool_calls and not message.content:
                return  # only tool calls: agent:tool_call reports them
            data["content"] = to_wire(message.content, self.max_chars)
            data["role"] = message.type
            if tool_calls:
                data["tool_calls"] = [c["name"] for c in tool_calls]
        else:
            data["content"] = _truncate(generation.text, self.max_chars)
            data["role"] = "ai"
        self._emit(MESSAGE, data)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID,
                           parent_run_id: UUID | None = None, tags: list[str] | None = None,
                           **kwargs: Any) -> None:
        self._emit(FAILED, {"stage": "model", **_error(error), **_ids(run_id, parent_run_id)})

    async def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID,
                               parent_run_id: UUID | None = None, tags: list[str] | None = None,
                               **kwargs: Any) -> None:
        if self.tokens and token:
            self._emit_token(token if isinstance(token, str) else str(to_wire(token)), run_id)

    # -- chains (graph runs and nodes) ------------------------------------------------------
    async def on_chain_error(self, error: BaseException, *, run_id: UUID,
                             parent_run_id: UUID | None = None, tags: list[str] | None = None,
                             **kwargs: Any) -> None:
        # Every enclosing chain reports the same error; publish it once, for the outermost run.
        if parent_run_id is not None or type(error).__name__ in _CONTROL_FLOW:
            return
        self._emit(FAILED, {"stage": "graph", **_error(error), **_ids(run_id, parent_run_id)})


class GraphAgent:
    """Serves a compiled LangGraph graph as an agent.

    The payload becomes the graph input: a dict is the input state as is, a string becomes
    ``{input_key: [HumanMessage(text)]}``. The message's session is the checkpointer thread
    (``configurable.thread_id``), the context is in ``configurable`` (see
    :func:`coordinator_context`) and an :class:`EventCallbackHandler` is attached. The reply is
    the final state, or ``state[output_key]``, converted with :func:`to_wire`. A message with a
    deadline runs under ``fail_after`` with the time left.

    :param config: a base RunnableConfig merged under each run's own
    :param events: attach the event handler (``True``), not at all (``False``)
    :param tokens: stream model tokens to the session's token stream (``emit_token``)
    """

    def __init__(self, agent_id: str, graph: Graph, *, input_key: str = "messages",
                 output_key: str | None = None, config: RunnableConfig | None = None,
                 events: bool = True, tokens: bool = False) -> None:
        self.agent_id = agent_id
        self.graph = graph
        self.input_key = input_key
        self.output_key = output_key
        self.config: RunnableConfig = config or {}
        self.events = events
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"GraphAgent({self.agent_id!r}, output_key={self.output_key!r})"

    def graph_input(self, payload: Any) -> Any:
        """The graph input for a message payload."""
        if isinstance(payload, Mapping):
            return dict(payload)
        if isinstance(payload, str):
            return {self.input_key: [HumanMessage(payload)]}
        if isinstance(payload, BaseMessage):
            return {self.input_key: [payload]}
        if isinstance(payload, Sequence) and not isinstance(payload, (bytes, bytearray)):
            return {self.input_key: [HumanMessage(str(p)) if not isinstance(p, Mapping)
                                     else p for p in payload]}
        raise TypeError(f"{self.agent_id}: cannot turn a {type(payload).__name__} payload "
                        "into graph input (send a dict or a string)")

    def run_config(self, message: Message, context: Context) -> RunnableConfig:
        """The RunnableConfig of one run: thread, context, callbacks, run name and metadata."""
        base = self.config
        configurable = {**(base.get("configurable") or {}), CONTEXT_KEY: context}
        if message.session_id:
            configurable["thread_id"] = message.session_id
        callbacks: Any = base.get("callbacks")
        if self.events:
            handler = EventCallbackHandler(context, tokens=self.tokens)
            if callbacks is None:
                callbacks = [handler]
            elif isinstance(callbacks, (list, tuple)):
                callbacks = [*callbacks, handler]
            else:  # a callback manager shared by every run: add to a copy
                callbacks = callbacks.copy()
                callbacks.add_handler(handler, inherit=True)
        metadata = {**(base.get("metadata") or {}), "agent_id": self.agent_id,
                    "message_id": message.id, "session_id": message.session_id}
        config: RunnableConfig = {**base, "configurable": configurable, "metadata": metadata,
                                  "run_name": base.get("run_name") or self.agent_id}
        if callbacks is not None:
            config["callbacks"] = callbacks
        return config

    async def handle(self, message: Message, context: Context) -> Any:
        """Run the graph on the message; the reply is the (converted) final state."""
        graph_input = self.graph_input(message.payload)
        config = self.run_config(message, context)
        deadline_ms = message.envelope.deadline_ms
        if deadline_ms is None:
            state = await self.graph.ainvoke(graph_input, config)
        else:
            remaining = deadline_ms / 1000 - time.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.agent_id}: deadline passed before the graph started")
            with anyio.fail_after(remaining):
                state = await self.graph.ainvoke(graph_input, config)
        context.raise_if_lost()
        return self.reply(state)

    def reply(self, state: Any) -> Any:
        """The reply for a final state: ``state[output_key]`` (or all of it), msgpack-safe."""
        if self.output_key is not None:
            if not isinstance(state, Mapping) or self.output_key not in state:
                raise KeyError(f"{self.agent_id}: final state has no {self.output_key!r}")
            state = state[self.output_key]
        return to_wire(state)
