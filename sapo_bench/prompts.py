"""The text the policy sees: instructions, tags and tool feedback (Search-R1 compatible, DESIGN §4).

Texts are the published ones verbatim, including Search-R1's "as your want".
"""

from __future__ import annotations

SEARCH_R1 = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
    "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
    "engine by <search> query </search> and it will return the top searched results between <information> "
    "and </information>. You can search as many times as your want. If you find no further external "
    "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
)
SAPO = (
    "You are a helpful assistant excel at answering questions with multi-turn search engine calling. To "
    "answer questions, you must first reason through the available information using <think> and </think>. "
    "If you identify missing knowledge, you may issue a search request using <search> query </search> at any "
    "time. The retrieval system will provide you with the three most relevant documents enclosed in "
    "<documents> and </documents>. You may send multiple search requests if needed. Once you have sufficient "
    "information, provide a concise final answer using <answer> and </answer>. For example, <answer> Donald "
    "Trump </answer>. Question: {question}\n"
)
# The micro scale's instruction: the same protocol and tags in one line. A model trained from
# scratch gets nothing from 118 tokens of constant preamble but their cost (~40% of a sequence).
MICRO = ("Answer the question. Search with <search> query </search>, read the <information>, answer with "
         "<answer> answer </answer>. Question: {question}\n")
TEMPLATES = {"search_r1": SEARCH_R1, "sapo": SAPO, "micro": MICRO}
# Which tags wrap retrieved passages under each template.
OBSERVATION_TAG = {"search_r1": "information", "sapo": "documents", "micro": "information"}
INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)
TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>",
        "<information>", "</information>", "<documents>", "</documents>")


def normalize_question(question: str) -> str:
    """Search-R1 strips the question and makes it end in '?' (NQ's questions have none)."""
    q = question.strip()
    return q if q.endswith("?") else q + "?"


def make_prompt(question: str, template: str = "search_r1") -> str:
    try:
        text = TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}") from None
    return text.format(question=normalize_question(question))


def observation(passages_text: str, template: str = "search_r1") -> str:
    """The block inserted after a search: masked from the loss, like all inserted text."""
    tag = OBSERVATION_TAG[template]
    return f"\n\n<{tag}>{passages_text}</{tag}>\n\n"
