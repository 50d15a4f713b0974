"""The embedded default: a synthetic community-QA site, generated offline from a seed and
written as a Stack Exchange ``Posts.xml`` dump so it goes through the very same ingestion.

The site has three kinds of question about an *entity* (a ``<domain> <noun>`` phrase such as
"git branch"), and each kind asks for a kind of content:

============  ======================================  =====================================
kind          title                                   wanted content
============  ======================================  =====================================
how           ``How do I <verb> a <entity>?``         a fenced code block
why           ``Why does my <entity> <symptom>?``     an explanation with "because"
what          ``What is a <entity> used for?``        a list of at least two "- " items
============  ======================================  =====================================

**Gold quality** ``gold(question, answer_text)`` in [0, 1] scores *any* answer text, including a
policy's generations; it never uses world knowledge, only how the answer relates to the question:

- 0.30 *addresses the question*: the answer names the question's entity (for a question with no
  known entity: the share of the question's content words the answer uses, up to 1 at 50%);
- 0.25 *gives the kind of content asked for* (table above);
- 0.15 *sensible length*: 1 for 25-90 words, falling linearly to 0 at 0 and at 180 words;
- 0.15 *clean ending*: the text ends with ``.``, ``!``, ``?`` or a closing code fence;
- 0.15 *no known-bad pattern*: no "thanks", "+1", "same problem", "no idea", "did you ever
  fix/solve", "google it", and no sentence repeated three times or more.

Votes (``Score``) are ``round(12 * gold - 3 + N(0, vote_noise))``; the accepted answer is the
gold-best answer with probability ``p_accept_best`` and another answer otherwise, and only a
``p_accepted`` share of questions has one, as on a real site. Training stages never see gold.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path

from cqa_rlhf.config import SynthConfig

DOMAINS = ("python", "git", "docker", "sql", "bash", "json", "http", "css", "linux", "java")
NOUNS = ("list", "branch", "container", "index", "loop", "file", "request", "grid", "test",
         "process", "key", "archive", "cache", "queue", "thread", "table", "socket", "module",
         "string", "array")
VERBS = ("sort", "copy", "delete", "rename", "merge", "parse", "reset", "split", "load", "save",
         "clean", "update")
SYMPTOMS = ("run slowly", "fail at startup", "return empty results", "crash on large inputs",
            "use too much memory", "hang forever", "lose data", "print warnings")
TOOLS = ("cli", "admin", "shell", "builder", "helper", "runner")
FLAGS = ("force", "all", "dry-run", "verbose", "quiet", "recursive", "safe", "fast")
CAUSES = ("is rebuilt on every call", "is never closed", "holds a stale lock", "is read twice",
          "grows without a limit", "waits for a missing resource", "is shared between workers",
          "uses the default settings")
USES = ("storing values in order", "sharing data between steps", "keeping a history of changes",
        "speeding up repeated work", "grouping related items", "passing results to other tools",
        "checking input before use", "tracking the state of a job")
FILLERS = ("Make sure you test it on a copy first.", "This works on most systems.",
           "Check the documentation for the details.", "It is a common source of confusion.",
           "You only need to do this once.", "Restart the program after the change.",
           "The same idea applies to other projects.", "Keep an eye on the logs while you try it.",
           "This is the approach most people use.", "It should take less than a minute.")
BAD = ("Thanks, I have the same problem.", "+1, did you ever fix this?", "No idea, sorry.",
       "Just google it.", "Thanks!")
CONTEXTS = ("It is part of a small project.", "I am new to this and the docs confuse me.",
            "This started after an update.", "I tried a few things without luck.",
            "It happens on my laptop and on the server.")

_ENTITY_RE = re.compile(r"\b(" + "|".join(DOMAINS) + r") (" + "|".join(NOUNS) + r")\b", re.I)
_BAD_RE = re.compile(r"\bthanks\b|\+1|same problem|no idea|did you ever (?:fix|solve)|google it", re.I)
_WORD_RE = re.compile(r"[a-z0-9]+")
_STOP = frozenset("the a an and or of to in on for is are do does my i how why what it this that with "
                  "be can you your use used from at as by have has was were will would should".split())
WEIGHTS = {"addresses": 0.30, "content": 0.25, "length": 0.15, "ending": 0.15, "clean": 0.15}


# --------------------------------------------------------------------------------------------
# Gold quality
# --------------------------------------------------------------------------------------------
def question_kind(question: str) -> str | None:
    title = question.lstrip().lower()
    for kind, prefix in (("how", "how do i"), ("why", "why does"), ("what", "what is")):
        if title.startswith(prefix):
            return kind
    return None


def question_entity(question: str) -> str | None:
    title = question.strip().split("\n", 1)[0]
    m = _ENTITY_RE.search(title) or _ENTITY_RE.search(question)
    return f"{m.group(1).lower()} {m.group(2).lower()}" if m else None


def _has_content(kind: str | None, answer: str) -> bool:
    has_code = re.search(r"```\n[^\n`]*\S[^\n]*\n(?:.*\n)*?```", answer) is not None
    has_because = re.search(r"\bbecause\b", answer, re.I) is not None
    has_list = len(re.findall(r"^- \S", answer, re.M)) >= 2
    if kind == "how":
        return has_code
    if kind == "why":
        return has_because
    if kind == "what":
        return has_list
    return has_code or has_because or has_list


def gold_components(question: str, answer: str) -> dict[str, float]:
    """Each criterion of :func:`gold` in [0, 1], before weighting."""
    answer = answer.strip()
    entity = question_entity(question)
    if entity is not None:
        addresses = 1.0 if re.search(r"\b" + re.escape(entity) + r"\b", answer, re.I) else 0.0
    else:
        qwords = {w for w in _WORD_RE.findall(question.lower()) if w not in _STOP and len(w) > 2}
        awords = set(_WORD_RE.findall(answer.lower()))
        addresses = min(1.0, 2 * len(qwords & awords) / len(qwords)) if qwords else 0.0
    words = len(answer.split())
    if words < 25:
        length = words / 25
    elif words <= 90:
        length = 1.0
    else:
        length = max(0.0, 1 - (words - 90) / 90)
    ending = 1.0 if answer.endswith((".", "!", "?", "```")) else 0.0
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n+", answer) if s.strip()]
    repeated = any(sentences.count(s) >= 3 for s in set(sentences))
    clean = 0.0 if (_BAD_RE.search(answer) or repeated) else 1.0
    return {
        "addresses": addresses,
        "content": 1.0 if answer and _has_content(question_kind(question), answer) else 0.0,
        "length": length,
        "ending": ending if answer else 0.0,
        "clean": clean if answer else 0.0,
    }


def gold(question: str, answer: str) -> float:
    """Hidden gold quality of ``answer`` to ``question`` in [0, 1] (see module doc)."""
    comps = gold_components(question, answer)
    return round(sum(WEIGHTS[k] * v for k, v in comps.items()), 6)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthQuestion:
    kind: str
    entity: str
    verb: str
    symptom: str
    title: str
    body: str  # canonical text


def _make_question(rng: random.Random) -> SynthQuestion:
    kind = rng.choice(("how", "why", "what"))
    entity = f"{rng.choice(DOMAINS)} {rng.choice(NOUNS)}"
    verb, symptom = rng.choice(VERBS), rng.choice(SYMPTOMS)
    if kind == "how":
        title = f"How do I {verb} a {entity}?"
        body = f"I have a {entity} in my project and I need to {verb} it. {rng.choice(CONTEXTS)}"
    elif kind == "why":
        title = f"Why does my {entity} {symptom}?"
        body = f"My {entity} started to {symptom}. {rng.choice(CONTEXTS)} What is going on?"
    else:
        title = f"What is a {entity} used for?"
        body = f"I keep seeing the {entity} in examples. {rng.choice(CONTEXTS)} What are the common uses?"
    return SynthQuestion(kind, entity, verb, symptom, title, body)


def _content(kind: str, q: SynthQuestion, entity: str, rng: random.Random) -> str:
    slug = entity.replace(" ", "-")
    if kind == "how":
        cmd = f"{entity.split()[0]}-{rng.choice(TOOLS)} {q.verb} {slug} --{rng.choice(FLAGS)}"
        return f"Run this:\n\n```\n{cmd}\n```"
    if kind == "why":
        return f"This happens because the {entity} {rng.choice(CAUSES)}."
    uses = rng.sample(USES, 3)
    return "Common uses are:\n\n" + "\n".join(f"- {u}" for u in uses)


def _make_answer(q: SynthQuestion, rng: random.Random) -> str:
    """An answer whose qualities are drawn independently, so votes have something to learn."""
    addresses = rng.random() < 0.6
    right_kind = rng.random() < 0.5
    length = rng.choices(("short", "ok", "long"), weights=(0.15, 0.7, 0.15))[0]
    clean_end = rng.random() < 0.8
    bad = rng.random() < 0.2

    entity = q.entity
    if not addresses:
        while entity == q.entity:
            entity = f"{rng.choice(DOMAINS)} {rng.choice(NOUNS)}"
    if q.kind == "how":
        opener = f"To {q.verb} a {entity}, use the {entity.split()[0]} {rng.choice(TOOLS)}."
    elif q.kind == "why":
        opener = f"A {entity} can {q.symptom} for a simple reason."
    else:
        opener = f"A {entity} is used for several things."
    kind = q.kind if right_kind else rng.choice([k for k in ("how", "why", "what") if k != q.kind])
    blocks = [opener, _content(kind, q, entity, rng)]
    n_fill = {"short": 0, "ok": rng.randint(1, 3), "long": rng.randint(14, 20)}[length]
    if length == "short":
        blocks = [rng.choice(blocks)]
    fillers = [rng.choice(FILLERS) for _ in range(n_fill)]
    if fillers:
        blocks.append(" ".join(fillers))
    if bad:
        bad_text = rng.choice(BAD)
        blocks.insert(0 if rng.random() < 0.5 else len(blocks), bad_text)
    text = "\n\n".join(blocks)
    if not clean_end:
        text = _truncate(text, rng)
    return text


def _truncate(text: str, rng: random.Random) -> str:
    """Cut the text mid-sentence, as an answer that trails off (never inside a code fence)."""
    words = text.rstrip(".!?` \n").split(" ")
    cut = max(1, len(words) - rng.randint(1, 3))
    out = " ".join(words[:cut]).rstrip(".!?,:- \n")
    if out.count("```") % 2 == 1:
        out = out[: out.rfind("```")].rstrip()
    return out or "Well"


def text_to_html(text: str) -> str:
    """Render canonical text (see :mod:`cqa_rlhf.data.html`) as a post body; the inverse of
    ``html_to_text`` on the texts this module writes."""
    parts = []
    for block in text.split("\n\n"):
        if block.startswith("```\n") and block.endswith("\n```"):
            parts.append(f"<pre><code>{escape(block[4:-4], quote=False)}\n</code></pre>")
        elif all(line.startswith("- ") for line in block.split("\n")):
            items = "".join(f"<li>{escape(line[2:], quote=False)}</li>" for line in block.split("\n"))
            parts.append(f"<ul>\n{items}\n</ul>")
        else:
            parts.append(f"<p>{escape(block, quote=False)}</p>")
    return "\n\n".join(parts) + "\n"


def _attr(value: str) -> str:
    """XML attribute escaping as in real dumps: newlines as &#xA; so they survive parsing."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("\r", "&#xD;").replace("\n", "&#xA;").replace("\t", "&#x9;"))


def _row(**attrs: object) -> str:
    return "  <row " + " ".join(f'{k}="{_attr(str(v))}"' for k, v in attrs.items() if v is not None) + " />"


def generate_rows(cfg: SynthConfig) -> list[str]:
    """All ``<row>`` lines of the site, in Id order; deterministic in ``cfg``."""
    rng = random.Random(cfg.seed)
    rows: list[str] = []
    next_id = 1
    for n in range(cfg.n_questions):
        q = _make_question(rng)
        qid = next_id
        next_id += 1
        n_ans = rng.randint(cfg.min_answers, cfg.max_answers)
        texts = [_make_answer(q, rng) for _ in range(n_ans)]
        golds = [gold(f"{q.title}\n\n{q.body}", t) for t in texts]
        votes = [round(12 * g - 3 + rng.gauss(0.0, cfg.vote_noise)) for g in golds]
        ids = list(range(next_id, next_id + n_ans))
        next_id += n_ans
        accepted = None
        if n_ans and rng.random() < cfg.p_accepted:
            best = max(range(n_ans), key=lambda i: (golds[i], -i))
            if rng.random() < cfg.p_accept_best or n_ans == 1:
                accepted = ids[best]
            else:
                accepted = ids[rng.choice([i for i in range(n_ans) if i != best])]
        day = f"2020-{1 + n * 12 // max(cfg.n_questions, 1):02d}-{1 + n % 28:02d}T12:00:00.000"
        rows.append(_row(Id=qid, PostTypeId=1, AcceptedAnswerId=accepted, CreationDate=day,
                         Score=max(votes, default=0), Body=text_to_html(q.body), Title=q.title,
                         Tags=f"<{q.entity.split()[0]}><{q.kind}>", AnswerCount=n_ans))
        for aid, text, v in zip(ids, texts, votes):
            rows.append(_row(Id=aid, PostTypeId=2, ParentId=qid, CreationDate=day, Score=v,
                             Body=text_to_html(text)))
        if n % 97 == 0:  # tag-wiki excerpt + body: post types other than Q/A, as in real dumps
            rows.append(_row(Id=next_id, PostTypeId=4, CreationDate=day, Score=0,
                             Body=f"<p>Questions about {q.entity.split()[0]}.</p>\n"))
            rows.append(_row(Id=next_id + 1, PostTypeId=5, CreationDate=day, Score=0, Body=""))
            next_id += 2
        if n % 211 == 5:  # an answer whose question was deleted
            rows.append(_row(Id=next_id, PostTypeId=2, ParentId=10**9 + n, CreationDate=day,
                             Score=1, Body="<p>An answer to a deleted question.</p>\n"))
            next_id += 1
    return rows


def write_dump(cfg: SynthConfig) -> Path:
    """Write ``<cfg.out>/Posts.xml`` as a real dump (BOM, CRLF), atomically."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "Posts.xml"
    tmp = out / f".Posts.xml.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8-sig", newline="\r\n") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        for row in generate_rows(cfg):
            f.write(row + "\n")
        f.write("</posts>\n")
    os.replace(tmp, path)
    return path
