"""A research team of three LangGraph graphs served as agents, on an offline scripted model.

- ``planner`` splits a question into sub-questions and delegates through tool calls:
  ``ask_researcher`` (one per sub-question, run concurrently by the ToolNode, each a
  ``context.request("researcher", ...)``), then ``ask_writer`` with the findings; its answer
  is the writer's report.
- ``researcher`` calls a ``search`` tool over a small in-memory corpus (run by a ToolNode) and
  answers from what it found.
- ``writer`` turns a question and findings into a short report.

The agents may run on different nodes: ``coordinator node --agent agents.research:team`` serves
all three, ``agents.research:planner`` (or ``researcher``, ``writer``) one of them. The model is
a scripted fake chat model making real tool calls; nothing touches the network.

Payloads: planner and researcher take a question string (or ``{"messages": [...]}``); the
writer takes ``{"question": str, "findings": [str]}``. Replies are strings.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from typing_extensions import TypedDict

from coordinator import Context
from coordinator.integrations.langgraph import GraphAgent, coordinator_context

REQUEST_TIMEOUT_S = 30.0

CORPUS = {
    "streams": "Redis Streams are append-only logs; each entry has an id of milliseconds and "
               "a sequence number, and XADD appends to a stream.",
    "groups": "A consumer group delivers each stream entry to one consumer of the group; "
              "XREADGROUP reads new entries and XACK acknowledges them once handled.",
    "pending": "Entries read but not acknowledged stay in the group's pending entries list "
               "(PEL) with their consumer, idle time and delivery count.",
    "claim": "When a node crashes, its pending entries are claimed by a live consumer with "
             "XCLAIM or XAUTOCLAIM and delivered again, so no message is lost.",
    "retry": "A message whose handler keeps failing is retried with backoff and moved to a "
             "dead-letter stream after the maximum number of deliveries.",
    "heartbeat": "Nodes write heartbeats with a TTL; an expired heartbeat marks a node dead "
                 "so its peers take over its work within seconds.",
    "pubsub": "Redis Pub/Sub drops messages sent while a subscriber is disconnected; "
              "streams keep them until they are acknowledged.",
    "langgraph": "LangGraph builds agents as graphs of nodes over a shared state; a ToolNode "
                 "runs the tool calls a chat model asks for.",
}

_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how in is it of on or the to what when which "
    "who why with happens happen".split())


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOPWORDS}


@tool
def search(query: str) -> str:
    """Search the knowledge base; returns the best matching passages, one per line."""
    wanted = _words(query)
    scored = sorted(((len(wanted & (_words(text) | {key})), key, text)
                     for key, text in CORPUS.items()), reverse=True)
    hits = [f"[{key}] {text}" for score, key, text in scored[:2] if score > 0]
    return "\n".join(hits) or "no results"


class ScriptedChatModel(GenericFakeChatModel):
    """An offline chat model whose reply is a function of the conversation so far.

    ``bind_tools`` is supported (the script decides which tool calls to make); replies stream
    word by word when ``streaming`` is set, like GenericFakeChatModel.
    """

    script: Callable[[list[BaseMessage]], AIMessage]
    messages: Iterator[AIMessage | str] = iter(())
    streaming: bool = False

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self.script(messages))])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        return self._generate(messages, stop)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(**kwargs)

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"


def _call(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"call_{name}_{time.monotonic_ns()}",
            "type": "tool_call"}


def _last_human(messages: list[BaseMessage]) -> str:
    return next((str(m.content) for m in reversed(messages) if isinstance(m, HumanMessage)), "")


def _trailing_tool_messages(messages: list[BaseMessage]) -> list[ToolMessage]:
    out: list[ToolMessage] = []
    for m in reversed(messages):
        if not isinstance(m, ToolMessage):
            break
        out.append(m)
    return out[::-1]


def _remaining_s(context: Context) -> float:
    deadline_ms = context.message.envelope.deadline_ms
    if deadline_ms is None:
        return REQUEST_TIMEOUT_S
    return max(0.1, deadline_ms / 1000 - time.time() - 0.2)


# -- researcher ----------------------------------------------------------------------------
def researcher_script(messages: list[BaseMessage]) -> AIMessage:
    """Search for the question, then answer from the results."""
    results = _trailing_tool_messages(messages)
    question = _last_human(messages)
    if not results:
        return AIMessage("", tool_calls=[_call("search", query=question)])
    found = "\n".join(str(r.content) for r in results)
    passages = [re.sub(r"^\[\w+\] ", "", line) for line in found.splitlines()
                if line and line != "no results"]
    if not passages:
        return AIMessage(f"{question}: nothing found in the knowledge base.")
    return AIMessage(f"{question}: " + " ".join(passages))


class ResearchState(MessagesState):
    answer: str


def _tool_loop(step: str, llm: Any, tools: list[Any]) -> Any:
    """A graph where the model node ``step`` calls ``tools`` until it answers (``answer``)."""

    async def think(state: ResearchState) -> dict[str, Any]:
        reply = await llm.ainvoke(state["messages"])
        update: dict[str, Any] = {"messages": [reply]}
        if not reply.tool_calls:
            update["answer"] = str(reply.content)
        return update

    graph = StateGraph(ResearchState)
    graph.add_node(step, think)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, step)
    graph.add_conditional_edges(step, tools_condition)
    graph.add_edge("tools", step)
    return graph.compile()


def build_researcher(model: Any = None) -> Any:
    """The researcher graph: model <-> search ToolNode; ``answer`` holds the final reply."""
    llm = (model or ScriptedChatModel(script=researcher_script)).bind_tools([search])
    return _tool_loop("think", llm, [search])


# -- writer --------------------------------------------------------------------------------
def writer_script(messages: list[BaseMessage]) -> AIMessage:
    """Compose a report from a prompt of ``Question:`` and ``- finding`` lines."""
    prompt = _last_human(messages)
    question = re.search(r"^Question: (.*)$", prompt, re.M)
    findings = re.findall(r"^- (.*)$", prompt, re.M)
    lines = [f"Report: {question.group(1) if question else 'research'}", ""]
    lines += [f"{i}. {finding}" for i, finding in enumerate(findings, 1)]
    lines += ["", f"Based on {len(findings)} finding(s)."]
    return AIMessage("\n".join(lines))


class WriterState(TypedDict, total=False):
    question: str
    findings: list[str]
    report: str


def build_writer(model: Any = None) -> Any:
    """The writer graph: one model call turning question and findings into ``report``."""
    llm = model or ScriptedChatModel(script=writer_script)

    async def write(state: WriterState) -> dict[str, Any]:
        bullets = "\n".join(f"- {f}" for f in state.get("findings", []))
        prompt = f"Write a short report.\nQuestion: {state.get('question', '')}\n{bullets}"
        reply = await llm.ainvoke([HumanMessage(prompt)])
        return {"report": str(reply.content)}

    graph = StateGraph(WriterState)
    graph.add_node("write", write)
    graph.add_edge(START, "write")
    graph.add_edge("write", END)
    return graph.compile()


# -- planner -------------------------------------------------------------------------------
@tool
async def ask_researcher(question: str, config: RunnableConfig) -> str:
    """Ask the researcher agent one sub-question; returns its findings."""
    context = coordinator_context(config)
    reply = await context.request("researcher", question, timeout=_remaining_s(context))
    return str(reply)


@tool
async def ask_writer(question: str, findings: list[str], config: RunnableConfig) -> str:
    """Ask the writer agent for a report on the question from the findings."""
    context = coordinator_context(config)
    reply = await context.request("writer", {"question": question, "findings": findings},
                                  timeout=_remaining_s(context))
    return str(reply)


def split_question(question: str) -> list[str]:
    """Sub-questions: the parts of the question joined by "and"/";" (at least one)."""
    parts = [p.strip(" ?.,") for p in re.split(r"\s+and\s+|;", question) if p.strip(" ?.,")]
    return [p + "?" for p in parts] or [question]


def planner_script(messages: list[BaseMessage]) -> AIMessage:
    """Delegate each sub-question to the researcher, then the findings to the writer, then
    answer with the writer's report."""
    question = _last_human(messages)
    results = _trailing_tool_messages(messages)
    if not results:
        return AIMessage("", tool_calls=[_call("ask_researcher", question=q)
                                         for q in split_question(question)])
    if results[0].name == "ask_researcher":
        findings = [str(r.content) for r in results]
        return AIMessage("", tool_calls=[_call("ask_writer", question=question,
                                               findings=findings)])
    return AIMessage(str(results[-1].content))


def build_planner(model: Any = None) -> Any:
    """The planner graph: model <-> ToolNode of ask_researcher/ask_writer; ``answer``."""
    tools = [ask_researcher, ask_writer]
    llm = (model or ScriptedChatModel(script=planner_script)).bind_tools(tools)
    return _tool_loop("plan", llm, tools)


# -- agents --------------------------------------------------------------------------------
def planner() -> GraphAgent:
    """The ``planner`` agent (question string in, report string out)."""
    return GraphAgent("planner", build_planner(), output_key="answer")


def researcher() -> GraphAgent:
    """The ``researcher`` agent (question string in, findings string out)."""
    return GraphAgent("researcher", build_researcher(), output_key="answer")


def writer() -> GraphAgent:
    """The ``writer`` agent (``{"question", "findings"}`` in, report string out)."""
    return GraphAgent("writer", build_writer(), output_key="report")


def team() -> list[GraphAgent]:
    """All three agents, for one node: ``coordinator node --agent agents.research:team``."""
    return [planner(), researcher(), writer()]
