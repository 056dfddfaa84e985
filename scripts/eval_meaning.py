"""Judges what the eval's EnhanceTask/DecomposeTask answers say, written
independently of the service's own rules (src/task/), so that it can tell
whether those rules work.

Reads the corpus (eval/tasks.json), every answers file the eval bench wrote
(eval/answers/<backend>-<rpc>.json) and the prompts' worked examples
(src/task/examples.json, whatever they are at the time), and measures per
backend and RPC, over the answers returned:

- grounding: the share of parts (subtasks; an enhancement's description and
  each acceptance criterion) whose most similar corpus task, by WordLlama
  sentence embeddings, is their own task;
- copied example: the share of answers that contain content of a worked
  example's answer (a content-word bigram, or a rare word: one outside
  WordLlama's whole-word vocabulary that at most one corpus task uses) that
  the task's own inputs do not contain;
- malformed: the share of answers whose text carries dict/JSON markup, code
  fragments or stray leading punctuation that the task's inputs do not;
- unsupported specifics: the share of answers naming version numbers,
  figures, paths, file names, URLs or product names (CamelCase, acronyms,
  capitalised words inside a sentence) found nowhere in the task's inputs.

It writes these figures into the matching rows of eval/report.json and prints
them as a table; `--verbose` prints every offending item so that false
positives can be read. For the on-topic rule it also saves, per answer part,
the lexical overlap with the task and the embedding similarity to its own and
to the best other task (eval/on-topic/<backend>-<rpc>.json), and prints what
rules with a few thresholds would reject and how many ungrounded parts they
would catch, with WordLlama's measured cost per part.

Run with the project venv's python after the eval bench (`make eval` does
both). WordLlama's weights ship inside its wheel; nothing is downloaded.
"""

import argparse
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Words that carry no topic: English function words and the verbs and nouns
# every task or answer uses whatever it is about. Removed before words of an
# answer are compared with words of its task.
STOPWORDS = set(
    """a about above after again against all also am an and any are as at be
    because been before being below between both but by can cannot could did do
    does doing done down during each either else etc ever every few for from
    further had has have having he her here hers him his how i if in into is it
    its itself just least less let like may me might more most much must my no
    nor not now of off on once one only or other our ours out over own per same
    shall she should since so some such than that the their theirs them then
    there these they this those through to too under until up upon us very via
    was we were what when where whether which while who whom whose why will with
    within without would yet you your yours""".split()
)
GENERIC = set(
    """able add added adding allow allowed allows another appropriate based
    basic better change changed changes check clear correct correctly create
    created creates current currently define defined describe detail details
    different done easy ensure ensures etc existing feature features first
    follow following get gets give given good handle handles help high implement
    implementation implemented implementing improve improved include includes
    including instead keep last level make makes making need needed needs new
    next note option optional part possible proper properly provide provided
    provides related relevant require required requirement requirements right
    run set sets should simple specific specified step steps sub subtask
    subtasks support supported supports sure take task tasks test tested
    testing tests thing things time two update updated updates use used useful
    user users uses using verify way ways well work works write written""".split()
)
# Acronyms that name no product: an answer may use them about any task.
GENERIC_ACRONYMS = set(
    """API APIS CI CLI CPU CRUD CSS DB DNS FAQ GB GPU GUI HTML HTTP HTTPS ID IDS
    IP JSON KB MB MS OK OS PR QA RAM REST SDK SQL SSL TB TCP TLS UDP UI URL URLS
    UX XML YAML""".split()
)
# Characters and sequences of dict/JSON literals and code.
MARKUP = ["{", "}", "[", "]", "`", "</", "/>", "=>", "->", "::", "==", "!=", "&&", "||", ";\n", "\\n", "\\\""]
QUOTE_COLON = re.compile(r"""['"][\w\s-]{0,40}['"]\s*:""")
# A call: an identifier glued to its parentheses, empty or holding an
# identifier-like argument list ("user(s)" is prose, not code).
CALL = re.compile(r"\b[A-Za-z_][\w.]*\((?!s\))[\w\s,.'\"=]*\)")
LEADING_PUNCTUATION = re.compile(r"""^\s*([^\w\s(“"'])""")

WORD = re.compile(r"[a-z0-9]+")
NUMBER = re.compile(r"(?<![A-Za-z0-9.])v?(\d+(?:\.\d+)*)")
URL = re.compile(r"https?://[^\s)>\]'\"`]+")
PATH = re.compile(r"(?<![\w/])(?:\.{0,2}/)?[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+/?|(?<![\w/])/[A-Za-z0-9_.-]+")
FILE_NAME = re.compile(
    r"\b[\w-]+\.(?:py|rs|js|ts|tsx|jsx|go|java|kt|rb|php|cs|c|h|cpp|swift|dart|json|yaml|yml|toml|"
    r"ini|cfg|conf|md|rst|txt|csv|xlsx|sql|sh|html|css|xml|lock|env|log|gradle|proto)\b",
    re.IGNORECASE,
)
CAMEL = re.compile(r"\b[A-Za-z]*[a-z][A-Z][A-Za-z0-9]*\b|\b[A-Z]{2,}[a-z]{2,}[A-Za-z0-9]*\b")
ACRONYM = re.compile(r"\b[A-Z][A-Z0-9]{1,}s?\b")
CAPITALISED = re.compile(r"\b[A-Z][a-z][a-z0-9]*\b")
BULLET = r"(?:[-*•]\s*|\d+[.)]\s*)?"
SENTENCE_START = re.compile(rf"""(?:^\s*{BULLET}|[.!?:;]\s+{BULLET}|\s[-–—]\s+|\n\s*{BULLET}|["'“‘(\[]\s*)$""")

ON_TOPIC_OVERLAPS = (0, 1, 2)
ON_TOPIC_COSINES = (0.1, 0.15, 0.2, 0.3, 0.4)


def singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokens(text: str) -> list[str]:
    return [singular(word) for word in WORD.findall(text.lower())]


def content_words(text: str) -> list[str]:
    return [
        word
        for word in tokens(text)
        if word not in STOPWORDS and word not in GENERIC and not word.isdigit() and len(word) > 1
    ]


def content_bigrams(text: str) -> set[tuple[str, str]]:
    """Pairs of adjacent words that are both content words, within a phrase
    (punctuation ends one)."""
    pairs = set()
    for phrase in re.split(r"[.,;:!?()\[\]{}\"\n]+", text):
        words = tokens(phrase)
        keep = [word not in STOPWORDS and word not in GENERIC and not word.isdigit() for word in words]
        pairs |= {(words[i], words[i + 1]) for i in range(len(words) - 1) if keep[i] and keep[i + 1]}
    return pairs


@dataclass
class Task:
    """A corpus task and what its inputs say, in the forms the measures compare."""

    id: str
    size: str
    raw: str
    words: set[str] = field(init=False)
    content: set[str] = field(init=False)
    bigrams: set[tuple[str, str]] = field(init=False)
    numbers: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.words = set(tokens(self.raw))
        self.content = set(content_words(self.raw))
        self.bigrams = content_bigrams(self.raw)
        self.numbers = set(NUMBER.findall(self.raw))

    @classmethod
    def from_corpus(cls, item: dict) -> "Task":
        parts = [item["title"], item.get("description") or "", item.get("project") or "", item.get("prd") or ""]
        parts += item.get("context_files", []) + item.get("dependencies", [])
        raw = "\n".join(part for part in parts if part)
        return cls(id=item["id"], size=item["size"], raw=raw)


@dataclass
class Part:
    """A piece of an answer judged on its own: a subtask, an enhancement's
    description or one acceptance criterion."""

    task: str
    kind: str
    text: str


@dataclass
class Answer:
    task: Task
    fields: list[tuple[str, str]]
    parts: list[Part]


def answer_of(rpc: str, task: Task, answer: dict) -> Answer:
    fields: list[tuple[str, str]] = []
    parts: list[Part] = []
    if rpc == "decompose":
        for index, subtask in enumerate(answer.get("subtasks", [])):
            for name in ("title", "description", "reasoning"):
                fields.append((f"subtasks[{index}].{name}", subtask.get(name, "")))
            parts.append(Part(task.id, "subtask", f"{subtask.get('title', '')}. {subtask.get('description', '')}"))
    else:
        fields.append(("title", answer.get("title", "")))
        fields.append(("description", answer.get("description", "")))
        parts.append(Part(task.id, "description", answer.get("description", "")))
        for index, criterion in enumerate(answer.get("acceptance_criteria", [])):
            fields.append((f"acceptance_criteria[{index}]", criterion))
            parts.append(Part(task.id, "criterion", criterion))
    return Answer(task, fields, parts)


class Embedder:
    """WordLlama (l2_supercat, 256 dimensions) loaded from its wheel's own files."""

    def __init__(self) -> None:
        import wordllama
        from wordllama import WordLlama

        # Its modules log each load at INFO through the root logger.
        logging.getLogger().setLevel(logging.WARNING)
        package = Path(wordllama.__file__).parent
        self.model = WordLlama.load("l2_supercat", dim=256, cache_dir=package, disable_download=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.embed(texts, norm=True), dtype=np.float32)

    def pieces(self, word: str) -> int:
        """Tokens the word takes inside a sentence: 1 for a word of the vocabulary."""
        encoding = self.model.tokenizer.encode(" " + word, add_special_tokens=False)
        return sum(piece != "▁" for piece in encoding.tokens)

    def cost_ms(self, texts: list[str]) -> float:
        """Mean milliseconds to embed one text on its own, as a rule checking one
        answer part would."""
        started = time.perf_counter()
        for text in texts:
            self.model.embed([text], norm=True)
        return (time.perf_counter() - started) * 1000 / max(len(texts), 1)


class ExampleContent:
    """What a worked example's answer says that a model could copy: its
    content-word bigrams, and its rare words: words outside WordLlama's
    whole-word vocabulary (split into pieces, as "potter" or "serializer")
    that at most one corpus task uses."""

    def __init__(self, examples: dict, corpus: list[Task], embedder: "Embedder") -> None:
        texts = [
            text
            for rpc in examples.values()
            for example in rpc
            for key, value in example["answer"].items()
            if key != "kind"  # the enhancement kind's name, not content
            for text in strings(value)
        ]
        self.bigrams: set[tuple[str, str]] = set()
        words: set[str] = set()
        for text in texts:
            self.bigrams |= content_bigrams(text)
            words |= set(content_words(text))
        self.rare = {
            word
            for word in words
            if embedder.pieces(word) > 1 and sum(word in task.content for task in corpus) <= 1
        }

    def copied(self, text: str, task: Task) -> list[str]:
        found = [
            f"bigram '{' '.join(pair)}'"
            for pair in sorted(content_bigrams(text) & self.bigrams)
            if pair not in task.bigrams
        ]
        found += [
            f"rare word '{word}'"
            for word in sorted(set(content_words(text)) & self.rare)
            if word not in task.words
        ]
        return found


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    return []


def offending(answer: Answer, check) -> list[str]:
    """One line per field of the answer that `check(text, task)` objects
    to: what it found, then the field's text."""
    lines = []
    for name, text in answer.fields:
        found = check(text, answer.task)
        if found:
            lines.append(f"{answer.task.id} {name}: {', '.join(found)} | {text[:200]!r}")
    return lines


def malformed(text: str, task: Task) -> list[str]:
    raw = task.raw
    found = [f"markup {mark!r}" for mark in MARKUP if mark in text and mark not in raw]
    if not QUOTE_COLON.search(raw):
        found += [f"quote-colon {match!r}" for match in QUOTE_COLON.findall(text)]
    found += [f"code {call!r}" for call in CALL.findall(text) if call not in raw]
    leading = LEADING_PUNCTUATION.match(text)
    if leading and not re.search(r"(?m)^\s*" + re.escape(leading.group(1)), raw):
        found.append(f"leading {leading.group(1)!r}")
    return found


def title_case(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    long_words = [word for word in words if len(word) > 3]
    return len(long_words) >= 2 and sum(word[0].isupper() for word in long_words) >= 0.6 * len(long_words)


def unsupported(text: str, task: Task) -> list[str]:
    lower = task.raw.lower()
    found = [f"URL {url!r}" for url in URL.findall(text) if url.lower().rstrip(".,") not in lower]
    without_urls = URL.sub(" ", text)
    for path in PATH.findall(without_urls):
        if re.fullmatch(r"[A-Za-z]+/[A-Za-z]+", path):
            continue  # "and/or", "read/write": words, not a path
        if path.lower().rstrip(".,") not in lower:
            found.append(f"path {path!r}")
    found += [
        f"file name {file_name!r}"
        for file_name in FILE_NAME.findall(without_urls)
        if file_name.lower() not in lower
    ]
    for number in NUMBER.findall(without_urls):
        if not any(given == number or given.startswith(number + ".") for given in task.numbers):
            found.append(f"{'version' if '.' in number else 'figure'} {number!r}")
    names = set(CAMEL.findall(without_urls))
    names |= {word for word in ACRONYM.findall(without_urls) if word.rstrip("s") not in GENERIC_ACRONYMS}
    if not title_case(text):
        for match in CAPITALISED.finditer(without_urls):
            if not SENTENCE_START.search(without_urls[: match.start()]):
                names.add(match.group(0))
    found += [
        f"name {word!r}"
        for word in sorted(names)
        if singular(word.lower()) not in task.words and word.lower() not in lower
    ]
    return found


def share(count: int, total: int) -> float | None:
    return count / total if total else None


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def judge(path: Path, tasks: dict[str, Task], order: list[str], task_vectors: np.ndarray,
          embedder: Embedder, examples: ExampleContent, cost_sample: int) -> dict:
    data = json.loads(path.read_text())
    backend, rpc = data["backend"], data["rpc"]
    answers = []
    for call in data["calls"]:
        if call.get("answer"):
            answers.append(answer_of(rpc, tasks[call["task"]], call["answer"]))
    offences = {"copied": [], "malformed": [], "unsupported": []}
    counts = {"copied": 0, "malformed": 0, "unsupported": 0}
    checks = {"copied": examples.copied, "malformed": malformed, "unsupported": unsupported}
    for answer in answers:
        for measure, check in checks.items():
            found = offending(answer, check)
            if found:
                counts[measure] += 1
                offences[measure].extend(found)

    parts = [part for answer in answers for part in answer.parts if part.text.strip()]
    index = {task_id: position for position, task_id in enumerate(order)}
    records = []
    if parts:
        vectors = embedder.embed([part.text for part in parts])
        similarity = vectors @ task_vectors.T
        for part, row in zip(parts, similarity):
            own = index[part.task]
            others = row.copy()
            others[own] = -np.inf
            best_other = int(np.argmax(others))
            shared = sorted(set(content_words(part.text)) & tasks[part.task].content)
            records.append({
                "task": part.task,
                "size": tasks[part.task].size,
                "kind": part.kind,
                "text": part.text,
                "overlap": len(shared),
                "shared_words": shared,
                "cosine_own": round(float(row[own]), 4),
                "cosine_best_other": round(float(others[best_other]), 4),
                "best_other_task": order[best_other],
                "grounded": bool(row[own] >= others[best_other]),
            })
    cost = embedder.cost_ms([part.text for part in parts[:cost_sample]])
    grounded = sum(record["grounded"] for record in records)
    by_size: dict[str, list[int]] = {}
    for record in records:
        tally = by_size.setdefault(record["size"], [0, 0])
        tally[0] += record["grounded"]
        tally[1] += 1
    return {
        "backend": backend,
        "rpc": rpc,
        "tasks": data["tasks"],
        "answers_judged": len(answers),
        "parts_judged": len(records),
        "grounding": share(grounded, len(records)),
        "grounding_by_size": {size: share(g, n) for size, (g, n) in sorted(by_size.items())},
        "copied_example_rate": share(counts["copied"], len(answers)),
        "malformed_rate": share(counts["malformed"], len(answers)),
        "unsupported_specifics_rate": share(counts["unsupported"], len(answers)),
        "wordllama_ms_per_part": cost,
        "offences": offences,
        "records": records,
    }


def on_topic_rules(records: list[dict]) -> list[tuple[str, float | None, float | None, float | None]]:
    """What each candidate rule would reject: (rule, share of parts rejected,
    share of ungrounded parts caught, share of grounded parts rejected)."""
    ungrounded = [record for record in records if not record["grounded"]]
    grounded = [record for record in records if record["grounded"]]
    rules = [(f"overlap <= {t}", lambda r, t=t: r["overlap"] <= t) for t in ON_TOPIC_OVERLAPS]
    rules += [(f"cosine_own < {c}", lambda r, c=c: r["cosine_own"] < c) for c in ON_TOPIC_COSINES]
    rules += [
        (f"overlap = 0 and cosine_own < {c}", lambda r, c=c: r["overlap"] == 0 and r["cosine_own"] < c)
        for c in ON_TOPIC_COSINES
    ]
    rows = []
    for name, rejects in rules:
        rows.append((
            name,
            share(sum(map(rejects, records)), len(records)),
            share(sum(map(rejects, ungrounded)), len(ungrounded)),
            share(sum(map(rejects, grounded)), len(grounded)),
        ))
    return rows


def update_report(report_path: Path, results: list[dict]) -> None:
    report = json.loads(report_path.read_text()) if report_path.exists() else {"results": []}
    for result in results:
        for row in report.get("results", []):
            if row.get("backend") == result["backend"] and row.get("rpc") == result["rpc"] \
                    and row.get("tasks") == result["tasks"]:
                for key in ("answers_judged", "parts_judged", "grounding", "grounding_by_size",
                            "copied_example_rate", "malformed_rate", "unsupported_specifics_rate"):
                    row[key] = result[key]
    report_path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT / "eval/tasks.json")
    parser.add_argument("--answers", type=Path, default=ROOT / "eval/answers",
                        help="folder of the bench's <backend>-<rpc>.json files")
    parser.add_argument("--examples", type=Path, default=ROOT / "src/task/examples.json")
    parser.add_argument("--report", type=Path, default=ROOT / "eval/report.json",
                        help="report whose matching rows get the figures")
    parser.add_argument("--on-topic", type=Path, default=ROOT / "eval/on-topic",
                        help="folder for the per-part on-topic data")
    parser.add_argument("--cost-sample", type=int, default=200,
                        help="answer parts embedded one by one to measure WordLlama's cost")
    parser.add_argument("--verbose", action="store_true", help="print every offending item")
    args = parser.parse_args()

    corpus = [Task.from_corpus(item) for item in json.loads(args.corpus.read_text())]
    tasks = {task.id: task for task in corpus}
    order = [task.id for task in corpus]
    files = sorted(args.answers.glob("*-*.json"))
    if not files:
        sys.exit(f"no answers in {args.answers}: run the eval bench first")
    started = time.perf_counter()
    embedder = Embedder()
    load_ms = (time.perf_counter() - started) * 1000
    task_vectors = embedder.embed([task.raw for task in corpus])
    examples = ExampleContent(json.loads(args.examples.read_text()), corpus, embedder)

    results = [judge(path, tasks, order, task_vectors, embedder, examples, args.cost_sample) for path in files]
    args.on_topic.mkdir(parents=True, exist_ok=True)
    for result in results:
        (args.on_topic / f"{result['backend']}-{result['rpc']}.json").write_text(
            json.dumps(result["records"], indent=1, ensure_ascii=False) + "\n")
    update_report(args.report, results)

    if args.verbose:
        for result in results:
            for measure, items in result["offences"].items():
                print(f"\n## {result['backend']} {result['rpc']}: {measure} ({len(items)})")
                for item in items:
                    print(f"  {item}")
            print(f"\n## {result['backend']} {result['rpc']}: ungrounded parts")
            for record in result["records"]:
                if not record["grounded"]:
                    print(f"  {record['task']} {record['kind']} (own {record['cosine_own']:.2f} < "
                          f"{record['best_other_task']} {record['cosine_best_other']:.2f}): {record['text'][:160]!r}")

    print("\n| backend | RPC | answers judged | grounding (parts) | copied example | malformed | unsupported specifics |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['rpc']} | {r['answers_judged']}/{r['tasks']} | "
              f"{percent(r['grounding'])} ({r['parts_judged']}) | {percent(r['copied_example_rate'])} | "
              f"{percent(r['malformed_rate'])} | {percent(r['unsupported_specifics_rate'])} |")
    print("\nGrounding by corpus size:")
    print("| backend | RPC | " + " | ".join(sorted({s for r in results for s in r["grounding_by_size"]})) + " |")
    sizes = sorted({s for r in results for s in r["grounding_by_size"]})
    print("|---|---|" + "---|" * len(sizes))
    for r in results:
        print(f"| {r['backend']} | {r['rpc']} | " + " | ".join(percent(r["grounding_by_size"].get(s)) for s in sizes) + " |")

    print("\nOn-topic rules (parts: subtasks, enhancement descriptions and criteria; ungrounded by the grounding measure):")
    print("| backend | RPC | rule | parts rejected | ungrounded caught | grounded rejected |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for name, rejected, caught, wrong in on_topic_rules(r["records"]):
            print(f"| {r['backend']} | {r['rpc']} | {name} | {percent(rejected)} | {percent(caught)} | {percent(wrong)} |")
    costs = [r["wordllama_ms_per_part"] for r in results if r["parts_judged"]]
    if costs:
        print(f"\nWordLlama: loaded in {load_ms:.0f} ms; {statistics.mean(costs):.3f} ms per answer part "
              f"embedded one at a time (mean over {len(costs)} answers files)")
    print(f"report: {args.report}; on-topic data: {args.on_topic}/")


if __name__ == "__main__":
    main()
